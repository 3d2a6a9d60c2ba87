"""selfdistill.teacher: the EMA teacher accumulates in float32."""

import torch

from selfdistill.teacher import Teacher


def test_ema_teacher_accumulates_in_float32():
    """With decay 0.99 a step moves the teacher by 1 % of the student's change; in bfloat16 that rounds away."""
    generator = torch.Generator().manual_seed(0)
    student = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.copy_(torch.randn(64, 64, generator=generator) * 0.02)
    teacher = Teacher("ema", student, ema_decay=0.99)
    assert teacher.copy.weight.dtype == torch.float32
    start = teacher.copy.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(student.weight.abs() * 0.05 + 1e-4)  # a small move of every entry
    teacher.update()
    want = start + 0.01 * (student.weight.float() - start)
    torch.testing.assert_close(teacher.copy.weight, want, rtol=1e-6, atol=1e-9)
    assert (teacher.copy.weight != start).float().mean() > 0.99
