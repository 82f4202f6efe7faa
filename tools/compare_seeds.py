"""``dr-compare --seeds``: runs that differ only by seed, summed up per configuration.

    dr-compare runs/classify-s* runs/regress-s* --seeds --baseline runs/classify-s0

Runs are grouped by their ``config.json``: two runs are the same configuration when every
resolved option is equal except ``seed`` and the bookkeeping ones (``out``, ``resume``,
``quiet``). For each configuration it prints the number of seeds and the mean ± sd (sample
sd) over seeds of the test kappa and the test referable AUC, each run's at its best-val
epoch (the epoch best.pt holds, as the plain table chooses it). With two or more
configurations, each is compared with the baseline (``--baseline``: a run folder of it or
its label; the first configuration otherwise): the mean over seeds of (config − baseline),
paired by seed (only seeds both ran count), and a paired bootstrap 95 % interval of that
mean: the seeds are resampled with replacement ``--bootstrap`` times (generator seeded, so
the interval is reproducible) and the 2.5th and 97.5th percentiles of the resampled means
are reported. Fewer than two paired seeds give no interval.

Both eyes: a run folder that holds ``fusion.json`` (``dr-fuse --checkpoint RUN/best.pt
--shards DIR --out RUN``) adds two rows under its configuration, "+ both eyes blended" (the
trainer's blend weight and cut-points, chosen jointly on val) and "+ both eyes fused" (the
second-stage head), each with the test kappa of that report; they are compared with the
baseline like any configuration, paired by seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from trainer.base.runfiles import CONFIG_FILE, FUSION_FILE

NOT_CONFIGURATION = ("seed", "out", "resume", "quiet")  # what may differ within a group
FIGURES = (("test_qwk", "test kappa"), ("test_referable_auc", "test referable AUC"))
SEEDS_FILE = "seeds.md"
BOTH_EYES = (("blend", "both eyes blended"), ("fused", "both eyes fused"))  # fusion.json's keys


@dataclass
class Group:
    label: str
    config: dict
    runs: dict[int, object] = field(default_factory=dict)  # seed -> tools.compare_runs.Run
    figures: dict[str, dict[int, float]] = field(default_factory=dict)  # figure -> seed -> value


def run_config(path: Path) -> dict:
    try:
        raw = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} has no readable {CONFIG_FILE}; --seeds needs it") from None
    cfg = raw.get("config", raw)
    if "seed" not in cfg:
        raise UserError(f"{Path(path) / CONFIG_FILE} records no seed; --seeds needs it")
    return cfg


def group_runs(runs: list) -> list[Group]:
    """Runs grouped by configuration, in order of first appearance; a seed twice in one
    configuration is a UserError (which of the two would count?)."""
    groups: list[Group] = []
    for run in runs:
        cfg = run_config(run.path)
        key = {k: v for k, v in cfg.items() if k not in NOT_CONFIGURATION}
        group = next((g for g in groups if g.config == key), None)
        if group is None:
            group = Group(label="", config=key)
            groups.append(group)
        seed = int(cfg["seed"])
        if seed in group.runs:
            raise UserError(
                f"{run.path} and {group.runs[seed].path} are the same configuration with the "
                f"same seed {seed}; give one of them"
            )
        group.runs[seed] = run
    label_groups(groups)
    for group in groups:
        for name, _ in FIGURES:
            group.figures[name] = {}
        for seed, run in group.runs.items():
            best = run.best()
            for name, _ in FIGURES:
                value = None if best is None else best.get(name)
                if value is not None and not pd.isna(value):
                    group.figures[name][seed] = float(value)
    return [row for group in groups for row in (group, *both_eyes_groups(group))]


def both_eyes_groups(group: Group) -> list[Group]:
    """The rows "+ both eyes blended" and "+ both eyes fused" of a configuration, from the
    test kappas in the fusion.json of those of its runs that have one."""
    rows = []
    for key, words in BOTH_EYES:
        kappas = {}
        for seed, run in group.runs.items():
            path = Path(run.path) / FUSION_FILE
            if not path.is_file():
                continue
            try:
                kappas[seed] = float(json.loads(path.read_text())["kappa"]["test"][key])
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(
                    f"{path} holds no test kappa '{key}'; write it again with "
                    f"dr-fuse --checkpoint {Path(run.path) / 'best.pt'} --out {run.path}"
                ) from None
        if kappas:
            figures = {name: {} for name, _ in FIGURES} | {"test_qwk": kappas}
            runs = {seed: group.runs[seed] for seed in kappas}
            rows.append(Group(f"{group.label} + {words}", group.config, runs, figures))
    return rows


def label_groups(groups: list[Group]) -> None:
    """Each configuration named by the options whose values differ between them
    (``head=regress, lr=0.001``); a single one by its architecture and head."""
    if len(groups) == 1:
        cfg = groups[0].config
        groups[0].label = f"{cfg.get('arch', '?')}, {cfg.get('head', 'classify')}"
        return
    keys = sorted({k for g in groups for k in g.config})
    differing = [k for k in keys if len({json.dumps(g.config.get(k)) for g in groups}) > 1]
    for group in groups:
        group.label = ", ".join(f"{k}={group.config.get(k)}" for k in differing)


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def paired_bootstrap(
    diffs: list[float], resamples: int = 10_000, seed: int = 0
) -> tuple[float, float] | None:
    """The 95 % percentile interval of the mean of ``diffs`` (one per seed) under resampling
    of the seeds with replacement; None for fewer than two."""
    if len(diffs) < 2:
        return None
    d = np.asarray(diffs, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[picks].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def find_baseline(groups: list[Group], baseline: str | None) -> Group:
    if baseline is None:
        return groups[0]
    for group in groups:
        if group.label == baseline or any(
            Path(baseline).resolve() == run.path.resolve() for run in group.runs.values()
        ):
            return group
    raise UserError(
        f"--baseline {baseline} is neither one of the runs given nor a configuration's label "
        f"({'; '.join(g.label for g in groups)})"
    )


def seeds_table(groups: list[Group], baseline: str | None, resamples: int) -> str:
    base = find_baseline(groups, baseline)
    lines = [
        "| configuration | seeds | " + " | ".join(f"{t} (mean ± sd)" for _, t in FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for g in groups:
        cells = [mean_sd(list(g.figures[name].values())) for name, _ in FIGURES]
        seeds = ", ".join(str(s) for s in sorted(g.runs))
        lines.append(f"| {g.label} | {len(g.runs)} ({seeds}) | " + " | ".join(cells) + " |")
    others = [g for g in groups if g is not base]
    if others:
        lines += [
            "",
            f"Difference from the baseline ({base.label}), paired by seed, with a paired "
            f"bootstrap 95 % interval ({resamples} resamples of the seeds):",
            "",
            "| configuration | figure | paired seeds | mean difference | 95 % interval |",
            "|---|---|---|---|---|",
        ]
        for g in others:
            for name, title in FIGURES:
                if not g.figures[name]:
                    continue  # a figure this row does not have (both eyes: kappa only)
                common = sorted(set(g.figures[name]) & set(base.figures[name]))
                diffs = [g.figures[name][s] - base.figures[name][s] for s in common]
                mean = f"{np.mean(diffs):+.3f}" if diffs else "-"
                ci = paired_bootstrap(diffs, resamples)
                interval = "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
                lines.append(f"| {g.label} | {title} | {len(common)} | {mean} | {interval} |")
    return "\n".join(lines)
