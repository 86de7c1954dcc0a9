"""How often a checkpoint's detached shadow picks the attached model's greedy token: its worth as a drafter.

For each checkpoint, teacher-forced over held-out texts of its task (the test split): at every
predicted position, whether the detached argmax equals the attached argmax. Speculative split
decoding accepts a greedy draft exactly when they agree, so with per-token agreement ``a`` and
``k`` drafts a round yields about ``(1 - a^(k+1)) / (1 - a)`` tokens (independent positions assumed).
Also the attached and detached next-token accuracy against the text itself, and the agreement where
speculative decoding meets it: on the attached model's own greedy continuation (``--new-tokens``) of
the first ``--prompt-tokens`` tokens of held-out texts.

Usage::

    python -m benchmarks.draft_agreement runs/shakespeare-plain runs/shakespeare-distill

Results: ``benchmarks/results/draft_agreement.json`` (one entry per checkpoint, replaced on rerun).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from benchmarks.harness import RESULTS_DIR, machine_info, now, run_cli, save_json


def continuation_agreement(loaded, task, *, prompts: int, prompt_tokens: int, new: int) -> dict[str, Any]:
    """Agreement on the attached model's own greedy continuations (what speculative decoding drafts against)."""
    import torch

    from shadowpeft.reference_decode import greedy_decode

    agree = total = 0
    used = 0
    for example in task.test:
        ids = loaded.tokenizer(example.text, add_special_tokens=False).input_ids
        if len(ids) < prompt_tokens:
            continue
        prompt = torch.tensor([ids[:prompt_tokens]])
        with torch.inference_mode():
            attached = greedy_decode(loaded.model, prompt, max_new_tokens=new, mode="attached").tokens  # (1, new)
            full = torch.cat([prompt, attached], dim=1)
            detached = loaded.model(full, mode="detached").logits[0, prompt_tokens - 1 : -1].argmax(-1)
        agree += int((detached == attached[0]).sum())
        total += new
        used += 1
        if used == prompts:
            break
    a = agree / total
    return {
        "prompts": used,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new,
        "agreement": a,
        "expected_tokens_per_round": {k: (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1 for k in (2, 4, 8)},
    }


def agreement(
    checkpoint: Path,
    *,
    texts: int,
    max_length: int,
    prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Teacher-forced agreement and accuracies of one checkpoint on its task's held-out texts."""
    import torch

    from shadowpeft.train.datasets import TaskData
    from shadowpeft.train.encoding import PadCollator, encode_task
    from shadowpeft.train.evaluation import evaluation_subset
    from shadowpeft.train.jobs import load_for_eval

    loaded = load_for_eval(checkpoint, data=None, base=None)
    task = loaded.task
    subset = TaskData(task.name, task.kind, (), evaluation_subset(task.test, texts), task.labels)
    rows = encode_task(subset, loaded.tokenizer, split="test", max_length=max_length)
    collate = PadCollator.for_tokenizer(loaded.tokenizer, side="right")
    agree = right_attached = right_detached = total = 0
    model = loaded.model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate(list(rows[start : start + batch_size]))
            labels = batch.pop("labels")[:, 1:]
            keep = labels != -100
            attached = model(**batch, mode="attached").logits[:, :-1].argmax(-1)
            detached = model(**batch, mode="detached").logits[:, :-1].argmax(-1)
            agree += int(((attached == detached) & keep).sum())
            right_attached += int(((attached == labels) & keep).sum())
            right_detached += int(((detached == labels) & keep).sum())
            total += int(keep.sum())
    a = agree / total
    on_policy = continuation_agreement(loaded, subset, prompts=prompts, prompt_tokens=prompt_tokens, new=new_tokens)
    return {
        "on_policy": on_policy,
        "checkpoint": str(checkpoint),
        "task": task.name,
        "texts": len(rows),
        "positions": total,
        "agreement": a,
        "attached_accuracy": right_attached / total,
        "detached_accuracy": right_detached / total,
        "expected_tokens_per_round": {k: (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1 for k in (2, 4, 8)},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--texts", default=100, show_default=True, type=click.IntRange(1), help="Held-out texts per checkpoint.")
@click.option("--max-length", default=64, show_default=True, type=click.IntRange(8))
@click.option("--prompts", default=8, show_default=True, type=click.IntRange(1), help="Continuations per checkpoint.")
@click.option("--prompt-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS_DIR, show_default=True)
@click.pass_obj
def main(command: str, checkpoints, texts, max_length, prompts, prompt_tokens, new_tokens, threads, out) -> None:
    """Detached-vs-attached greedy agreement of CHECKPOINTS (see the module docstring)."""
    import torch

    torch.set_num_threads(threads)
    entries = []
    for checkpoint in checkpoints:
        entry = agreement(
            checkpoint,
            texts=texts,
            max_length=max_length,
            prompts=prompts,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
        )
        entries.append(entry)
        click.echo(
            f"{checkpoint}: agreement {entry['agreement']:.3f} over {entry['positions']} positions; next-token "
            f"accuracy attached {entry['attached_accuracy']:.3f}, detached {entry['detached_accuracy']:.3f}; on the "
            f"attached model's greedy continuations {entry['on_policy']['agreement']:.3f}"
        )
    record = {"benchmark": "draft_agreement", "command": command, "recorded": now(), "machine": machine_info(threads)}
    save_json(out / "draft_agreement.json", {**record, "checkpoints": entries})


if __name__ == "__main__":
    raise SystemExit(run_cli(main, None, module="benchmarks.draft_agreement"))
