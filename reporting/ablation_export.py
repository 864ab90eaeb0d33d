"""An ablation's results as a docs table: ablate.py's ablation.json -> one CSV row per variant for docs/results/.

Percent and points with two decimals, `seeds` as finished/planned, `per_seed` each finished seed's value; a
variant whose seeds are not all finished keeps its mean but gets no difference (as in ablate.py's own table).
Each row names the CPU, torch, date and the command that reproduces it.
    python -m reporting.ablation_export runs/ablation_default/ablation.json docs/results/ablation_default.csv \\
        --command "python ablate.py configs/ablation_default.yaml --out runs/ablation_default"
"""
import argparse
import csv
import json
import re
import sys

from utils.errors import UserError, run_cli


def cpu_name(env):
    """"AMD EPYC (AVX2+AVX-512+AVX512-BF16)": the model and the ISA features a speed depends on."""
    return f"{env.get('cpu_model') or 'unknown CPU'} ({env.get('isa') or 'no AVX2'})"


def anchor(name):
    """A link target for a variant: lower case, words joined by hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "variant"


def per_seed(values):
    """"s0 93.25 / s1 93.17": each finished seed's accuracy in percent, in seed order."""
    return " / ".join(f"s{k} {100 * values[str(k)]:.2f}" for k in sorted(int(k) for k in values))


def rows(doc, command, cpu=None):
    env = doc["environment"]
    out = []
    for v in doc["results"]["variants"]:
        pct = lambda x: "" if x is None else f"{100 * x:.2f}"  # noqa: E731
        delta = v.get("delta")
        out.append({"variant": v["name"], "seeds": f"{v['n']}/{v['seeds']}", "acc_mean": pct(v["mean"]),
                    "acc_std": pct(v["std"]), "per_seed": per_seed(v.get("values") or {}),
                    "delta_pts": "" if delta is None else f"{100 * delta:+.2f}",
                    "ci95_pts": pct(v.get("ci95")) if delta is not None else "",
                    "train_s": "" if v["train_seconds"] is None else f"{v['train_seconds']:.1f}",
                    "metric": v["metric"], "cpu": cpu or cpu_name(env), "torch": env["torch"].split("+")[0],
                    "date": env["date"][:10], "command": command, "anchor": anchor(v["name"])})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="ablate.py's ablation.json")
    p.add_argument("csv", help="the docs table to write")
    p.add_argument("--command", required=True, help="the command that reproduces the ablation")
    p.add_argument("--cpu", help="the CPU as the results pages name it (default: model and ISA from the JSON)")
    args = p.parse_args(argv)
    try:
        with open(args.json) as f:
            doc = json.load(f)
        table = rows(doc, args.command, args.cpu)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{args.json} is not an ablation.json written by ablate.py ({type(e).__name__}: {e}); "
                        "run ablate.py first") from None
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {args.csv} ({len(table)} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
