"""One rank of a 2-rank DINO pretraining run under srun: steps the real Trainer and records, after
every step, what each rank holds (a fingerprint of the student and teacher, the center) and what
the center should be (m·c + (1 − m)·mean of the teacher outputs over both ranks).

    srun python tests/slurm/pretrain_worker.py PARAMS OUT_DIR STEPS
"""

import json
import sys
from pathlib import Path

import torch

from stages.distributed import all_gather_cat, init_distributed
from stages.params import load_params
from stages.pretrain import Trainer


def fingerprint(module: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


def main(params_file: str, out_dir: str, steps: int) -> None:
    params = load_params(params_file)
    dist = init_distributed()
    trainer = Trainer(params, dist)
    m = params.pretrain.center_momentum
    records = []
    for batch in trainer.batches(0, 0):
        if len(records) == steps:
            break
        views = trainer.views(batch)
        with torch.no_grad():  # the teacher's output of this step (teacher unchanged until the EMA)
            teacher_out = trainer.teacher(views[: params.pretrain.global_crops_number])
        center_before = trainer.loss.center.clone()
        trainer.train_step(views)
        trainer.progress.global_step += 1
        all_teacher = all_gather_cat(teacher_out)
        expected = m * center_before + (1 - m) * all_teacher.mean(dim=0, keepdim=True)
        records.append({
            "student": fingerprint(trainer.student),
            "teacher": fingerprint(trainer.teacher),
            "center": trainer.loss.center.flatten().tolist(),
            "expected_center": expected.flatten().tolist(),
            "local_mean_center": (m * center_before + (1 - m) * teacher_out.mean(0, keepdim=True)).flatten().tolist(),
        })
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{dist.rank}.json").write_text(json.dumps({"world_size": dist.world_size, "steps": records}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
