"""Self-distillation (DASD by default) of a Qwen2.5 / Qwen3 model on GSM8K or MATH through TRL: the TRL route.

One GPU:
    python examples/trl/train_selfdistill.py --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset gsm8k \\
        --output_dir runs/dasd-gsm8k --bf16 --use_vllm --vllm_mode colocate

8 GPUs, DeepSpeed ZeRO-3, vLLM on the training GPUs (colocate):
    accelerate launch --config_file examples/trl/zero3.yaml examples/trl/train_selfdistill.py \\
        --model_name_or_path Qwen/Qwen3-8B --dataset math --output_dir runs/dasd-math --bf16 \\
        --use_vllm --vllm_mode colocate --vllm_gpu_memory_utilization 0.3

Every SelfDistillConfig / GRPOConfig option is a flag (`--objective egrsd`, `--objective_args '{"teacher": "ema"}'`,
`--num_iterations 2`, `--report_to wandb`, ...); `--config run.yaml` reads them from a file. `--help` lists them.

Data: `--dataset gsm8k` (openai/gsm8k, "main", its worked solutions as the privileged context), `--dataset math`
(`--math_hub_id`, default DigitalLearningGmbH/MATH-lighteval: problem + solution, the answer is the solution's last
\\boxed{}), `--dataset synthetic` (a generated task, for a CPU smoke run), or a path to a .jsonl / .parquet file read by
selfdistill.data.load_problems (TRL and verl column names are recognized). With `--data_root` the GSM8K files come from
a local folder (selfdistill.data.load_benchmark) instead of the Hugging Face hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from trl import TrlParser

from selfdistill.data import Problem, load_benchmark, load_problems, operation_chains
from selfdistill.grading import last_boxed
from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer, boxed_answer_reward, problems_to_dataset


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or folder."})
    dataset: str = field(default="gsm8k", metadata={"help": "gsm8k, math, synthetic, or a .jsonl/.parquet path."})
    data_root: str | None = field(default=None, metadata={"help": "Local benchmark folder (gsm8k/train.jsonl)."})
    math_hub_id: str = field(default="DigitalLearningGmbH/MATH-lighteval", metadata={"help": "MATH on the hub."})
    max_problems: int = field(default=0, metadata={"help": "Keep the first N problems (0: all)."})
    template: str = field(default="opsd_mild", metadata={"help": "Student and teacher prompt template."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})


def gsm8k_from_hub() -> list[Problem]:
    from datasets import load_dataset

    problems = []
    for i, row in enumerate(load_dataset("openai/gsm8k", "main", split="train")):
        worked, _, final = row["answer"].rpartition("####")
        problems.append(Problem(f"gsm8k-train-{i}", row["question"], final.replace(",", "").strip(), worked.strip(),
                                "gsm8k"))
    return problems


def math_from_hub(hub_id: str) -> list[Problem]:
    from datasets import load_dataset

    problems = []
    for i, row in enumerate(load_dataset(hub_id, split="train")):
        answer = last_boxed(row["solution"])
        if answer is not None:  # a handful of MATH solutions have no \boxed{} answer
            problems.append(Problem(f"math-train-{i}", row["problem"], answer, row["solution"], "math"))
    return problems


def load(script: ScriptArguments) -> list[Problem]:
    if script.dataset == "gsm8k":
        problems = load_benchmark("gsm8k", root=script.data_root, split="train") if script.data_root \
            else gsm8k_from_hub()
    elif script.dataset == "math":
        problems = math_from_hub(script.math_hub_id)
    elif script.dataset == "synthetic":
        problems = operation_chains(max(script.max_problems, 64), seed=0)
    elif Path(script.dataset).exists():
        problems = load_problems(script.dataset)
    else:
        raise SystemExit(f"--dataset {script.dataset!r}: gsm8k, math, synthetic, or an existing file")
    return problems[: script.max_problems] if script.max_problems else problems


def main() -> None:
    script, args = TrlParser((ScriptArguments, SelfDistillConfig)).parse_args_and_config()
    dataset = Dataset.from_list(problems_to_dataset(load(script), template=script.template))
    peft_config = None
    if script.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    reward = boxed_answer_reward()
    trainer = SelfDistillTrainer(model=script.model_name_or_path, reward_funcs=[reward], args=args,
                                 train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    trainer.save_model(args.output_dir)
    reward.close()


if __name__ == "__main__":
    main()
