"""Over-optimisation of the CLIP proxy, in the manner of Gao et al. (2023): the held-out gold
against the proxy's own gain over training, for Adjoint Matching on the single proxy and on the
worst-case ensemble of three, at the shipped tilt and at ten times it, and on the same three
uncertainty-weighted (UWO, Coste et al. 2024: mean - lambda x the members' variance) at ten times it.

    python bench/overoptimisation.py                 # train and score the stronger runs (resumable), then plot
    python bench/overoptimisation.py --recorded      # plot from the records only

The shipped configs' curves come from the leaderboard's records (bench/leaderboard: 3 training
seeds x 2 evaluation seeds of 100 held-out prompts a task). The stronger tilt is each shipped config
with ``method.reward_multiplier`` times ``--factor`` (written into ``<records>/configs/``), trained
and scored by ``genalign.leaderboard`` with its own, cheaper settings (default: training seed 0,
evaluation seed 1, 50 prompts a task: a hint, its gain paired with its own base images). The UWO run
is the stronger worst-case config with ``aggregate: uncertainty`` and ``uncertainty_weight``
``--uncertainty-weight`` (default 0.5, genalign's default; on members standardised by their spread
on the base model's images, as the worst case's are). Writes
``overoptimisation.png`` (``--plot``) and prints each curve's points.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("configs/shapes/adjoint_matching.yaml", "configs/shapes/adjoint_matching_ensemble.yaml")
NAMES = {"adjoint_matching": "am", "adjoint_matching_ensemble": "am_ensemble"}
UWO_FROM = "adjoint_matching_ensemble"  # the worst-case config the UWO run is made from


def stronger(config_text: str, factor: float) -> str:
    """The config with ``reward_multiplier`` times ``factor`` (every other line as it is)."""
    text, count = re.subn(r"(?m)^(\s*reward_multiplier:\s*)([0-9.eE+-]+)\s*$",
                          lambda m: f"{m.group(1)}{float(m.group(2)) * factor}", config_text)
    if count != 1:
        raise ValueError(f"expected one reward_multiplier line, found {count}")
    return text


def uncertainty_weighted(config_text: str, weight: float) -> str:
    """A worst-case ensemble config as the uncertainty-weighted one (UWO) with lambda ``weight``:
    its ``aggregate: worst`` line becomes ``aggregate: uncertainty`` and ``uncertainty_weight``, under
    a first line saying so (the worst-case header below it describes the rest)."""
    text, count = re.subn(r"(?m)^([ \t]*)aggregate:[ \t]*worst[ \t]*$",
                          lambda m: f"{m.group(1)}aggregate: uncertainty\n{m.group(1)}uncertainty_weight: {weight!r}",
                          config_text)
    if count != 1:
        raise ValueError(f"expected one 'aggregate: worst' line, found {count}")
    return (f"# bench/overoptimisation.py: the config below with aggregate: uncertainty (UWO, lambda {weight:g}) in "
            "place of worst\n" + text)


def uwo_name(factor: float, weight: float) -> str:
    """The UWO run's name: its lambda in it where it is not the default 0.5 (so that records of one
    lambda are never read as another's)."""
    return f"am_uwo_x{factor:g}" if weight == 0.5 else f"am_uwo_l{weight:g}_x{factor:g}"


def write_configs(records: Path, factor: float, uncertainty_weight: float | None = None) -> list[str]:
    """The stronger tilt's configs in ``records``/configs (rewritten only when changed); with
    ``uncertainty_weight``, also the UWO run's."""
    folder = records / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    texts = {f"{NAMES[Path(s).stem]}_x{factor:g}": stronger((ROOT / s).read_text(), factor) for s in SHIPPED}
    if uncertainty_weight is not None:
        worst = texts[f"{NAMES[UWO_FROM]}_x{factor:g}"]
        texts[uwo_name(factor, uncertainty_weight)] = uncertainty_weighted(worst, uncertainty_weight)
    paths = []
    for name, text in texts.items():
        path = folder / f"{name}.yaml"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        paths.append(str(path))
    return paths


def curves(results: dict, label: str) -> dict[str, list[dict]]:
    """Each method's (queries, proxy gain, gold gain, their errors) from a ``measure`` result, named
    with ``label`` and its number of training seeds."""
    out = {}
    for name, m in results["methods"].items():
        seeds = len(m["runs"])
        out[f"{name} ({label}, {seeds} seed{'s' * (seeds > 1)})"] = [
            {"queries": c["queries"], "proxy": c["proxy_gain"], "proxy_se": c["proxy_standard_error"],
             "gold": c["gain"], "gold_se": c["standard_error"], "seeds": c["seeds"]}
            for c in m["curve"] if "proxy_gain" in c]
    return out


def plot(all_curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    colours = {"adjoint_matching": "tab:blue", "adjoint_matching_ensemble": "tab:orange", "am": "tab:blue",
               "am_ensemble": "tab:orange", "am_uwo": "tab:green"}
    for name, points in all_curves.items():
        method = name.split(" ")[0]
        base = re.sub(r"(_l[0-9.]+)?_x[0-9.]+$", "", method)
        dashed = base != method
        xs, ys = [0.0] + [p["proxy"] for p in points], [0.0] + [p["gold"] for p in points]
        ax.errorbar(xs, ys, yerr=[0.0] + [p["gold_se"] for p in points],
                    xerr=[0.0] + [p["proxy_se"] if p["seeds"] > 1 else 0.0 for p in points],
                    color=colours.get(base, "tab:grey"), ls="--" if dashed else "-", marker="o", ms=4, capsize=2,
                    label=name)
        for p in points:
            ax.annotate(f"{p['queries']:,.0f}", (p["proxy"], p["gold"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("proxy gain (models/shapes/clip's score on held-out prompts; the ensemble's first member)")
    ax.set_ylabel("gold gain (exact evaluator, held-out prompts)")
    ax.set_title("Adjoint Matching on the CLIP proxy: gold against proxy over training\n"
                 "(points: reward queries; bars: one standard error; dashed: 10x the tilt)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, not on them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from genalign import leaderboard

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=float, default=10.0, help="the stronger tilt: reward_multiplier times this")
    parser.add_argument("--uncertainty-weight", type=float, default=0.5,
                        help="the UWO run's lambda (mean - lambda x variance over the standardised members)")
    parser.add_argument("--no-uwo", action="store_true", help="leave the uncertainty-weighted run out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--per-task", type=int, default=50)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--records", default="bench/overoptimisation")
    parser.add_argument("--out", default="runs/overoptimisation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recorded", action="store_true", help="plot from the records: train and score nothing")
    parser.add_argument("--plot", default="docs/img/overoptimisation.png")
    args = parser.parse_args()
    records = Path(args.records)
    if args.uncertainty_weight < 0:
        parser.error(f"--uncertainty-weight must be >= 0, got {args.uncertainty_weight}")
    configs = write_configs(records, args.factor, None if args.no_uwo else args.uncertainty_weight)
    common = ["--seeds", *map(str, args.seeds), "--per-task", str(args.per_task), "--eval-seeds",
              *map(str, args.eval_seeds), "--records", str(records), "--out", args.out, "--references"]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    if not args.recorded:
        leaderboard.main(["--configs", *configs, *common])
    shipped = leaderboard.measure(leaderboard.Settings(configs=list(SHIPPED), recorded=True, references=[]), log=lambda _: None)
    strong = leaderboard.measure(leaderboard.Settings(configs=configs, seeds=args.seeds, per_task=args.per_task,
                                                      eval_seeds=args.eval_seeds, records=str(records), recorded=True,
                                                      references=[]), log=lambda _: None)
    all_curves = {**curves(shipped, "shipped tilt"), **curves(strong, f"{args.factor:g}x the tilt")}
    print("| run | reward queries | proxy gain | gold gain |\n|---|---|---|---|")
    for name, points in all_curves.items():
        for p in points:
            proxy_se = f" ({p['proxy_se']:.2f})" if p["seeds"] > 1 else ""
            print(f"| {name} | {p['queries']:,.0f} | {p['proxy']:+.2f}{proxy_se} | {p['gold']:+.3f} ({p['gold_se']:.3f}) |")
    plot(all_curves, Path(args.plot))
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
