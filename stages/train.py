"""Stage: train from scratch or from train.init_from (or resume an interrupted run) and
publish <train.out_dir>/best.

Work in progress lives in .gptcore/runs/<fingerprint>/ (git-ignored, not a DVC out),
so an interrupted `dvc repro` resumes where it stopped while DVC keeps its run-cache
for this stage. The fingerprint covers the model/train/tokenizer params and the data,
so a changed param never resumes a different run.
"""

from pathlib import Path

from gptcore.config import flatten, load_params
from gptcore.data.dataset import TokenData
from gptcore.init_source import check_tracked
from gptcore.io import copy_dir
from gptcore.stage import declared_deps, outputs_inside, run_stage
from gptcore.tracking import Tracker, project_root, write_run_file
from gptcore.training import distributed, init_from, resume
from gptcore.training.loop import Trainer
from gptcore.training.metrics import write_train_outputs


def main() -> None:
    params = load_params()
    outputs_inside(params)
    data = TokenData.load(params.data.processed_dir)
    check_tracked(params.train.init_from, declared_deps("train", params.to_dict()), project_root())
    init = init_from.load_init(params.train.init_from, params.model, data.tokenizer)
    run = resume.fingerprint(params, data.meta, distributed.from_env().world_size,
                             init.digest if init is not None else None)
    work = project_root() / ".gptcore" / "runs" / run
    tracker = Tracker()
    trainer = Trainer(params, data, best_dir=work / "best", resume_dir=work / "last",
                      tracker=tracker, run_params=flatten(params.to_dict()), init=init)
    result = trainer.train()
    if not trainer.is_main:  # under torchrun, rank 0 alone publishes
        return
    copy_dir(work / "best", Path(params.train.out_dir) / "best")
    tracker.log_model(Path(params.train.out_dir) / "best", step=result.best_step,
                      version_tags=init.tags if init is not None else None)
    write_train_outputs(result, "metrics")
    write_run_file(tracker.run_id)
    tracker.log_metrics({"final_val_loss": result.final_val_loss, "best_step": result.best_step,
                         "train_tokens_per_s": result.tokens_per_s, "train_bytes_per_s": result.bytes_per_s,
                         "train_wall_time_s": result.wall_time_s,
                         "train_step_time_s": result.train_time_s}, step=result.steps)
    tracker.set_tags({"train.device_used": result.device, "train.dtype_used": result.dtype})
    tracker.end()  # training is done; evaluate and sample still log into the finished run
    resume.clear(work)
    print(f"best val loss {result.best_val_loss:.4f} at step {result.best_step}; "
          f"{result.tokens_per_s:,.0f} tokens/s ({result.bytes_per_s:,.0f} bytes of text/s)")


if __name__ == "__main__":
    run_stage(main)
