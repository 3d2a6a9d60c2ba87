"""selfdistill.integrations.ema: the EMA teacher's float32 average over low-precision weights."""


import torch


def test_ema_average_is_float32_over_low_precision_weights():
    """A bfloat16 teacher moved by 1 % of a small change a hundred times: the float32 average keeps it, an
    average kept in bfloat16 (TRL's SyncRefModelCallback) rounds every step away."""
    from selfdistill.integrations.ema import ShardedEma

    student = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    teacher = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    teacher.weight.data.fill_(1.0)
    student.weight.data.fill_(1.0 + 2 ** -6)  # one bfloat16 step above 1 is 2**-7; 1 % of this is far below it
    ema = ShardedEma(student.named_parameters(), teacher.named_parameters(), decay=0.99)
    naive = teacher.weight.detach().clone()
    for _ in range(100):
        ema.update()
        naive.lerp_(student.weight.detach(), 0.01)
    exact = 1.0 + 2 ** -6 * (1 - 0.99 ** 100)
    assert ema.average["weight"].dtype == torch.float32
    assert abs(float(ema.average["weight"][0, 0]) - exact) < 1e-6
    assert float(naive[0, 0]) == 1.0  # bfloat16 averaging never moved
    assert float(teacher.weight.detach()[0, 0]) > 1.0  # the teacher's weights follow the float32 average
