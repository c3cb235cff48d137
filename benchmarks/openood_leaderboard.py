"""Write ``lightning_ood/leaderboard/openood_v15.json`` from OpenOOD v1.5's published leaderboard CSVs.

The leaderboard (https://zjysteven.github.io/OpenOOD/) is built from ``results/<benchmark>.csv`` in the
repository github.com/zjysteven/OpenOOD. This script copies, verbatim, the rows of the standard classifier of each
benchmark (training ``CrossEntropy``; ResNet-18 for CIFAR-10/100 and ImageNet-200, ResNet-50 for ImageNet-1K) and
nothing else: no number is computed. Run it on a clone of that repository:

    git clone https://github.com/zjysteven/OpenOOD openood-leaderboard
    cd openood-leaderboard && C=$(git rev-parse HEAD) && D=$(git show -s --format=%cs HEAD) && cd -
    python benchmarks/openood_leaderboard.py openood-leaderboard --commit $C --date $D
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lightning_ood" / "leaderboard" / "openood_v15.json"
#: our benchmark name -> (the leaderboard's CSV, the architecture of its standard classifier, our backbone)
BENCHMARKS = {
    "openood_v15_cifar10": ("cifar10", "ResNet18", "openood_resnet18_32x32"),
    "openood_v15_cifar100": ("cifar100", "ResNet18", "openood_resnet18_32x32"),
    "openood_v15_imagenet200": ("imagenet200_ood", "ResNet18", "openood_resnet18_224x224"),
    "openood_v15_imagenet1k": ("imagenet1k_ood", "ResNet50", "resnet50"),
}
#: OpenOOD postprocessor -> the lightning-ood detector that computes the same score (``None``: none here yet).
DETECTORS = {
    "MSP": "msp",
    "MLS": "max_logit",
    "EBO": "energy",
    "GEN": "gen",
    "ODIN": "odin",
    "MDS": "mahalanobis",
    "RMDS": "rmd",
    "KNN": "knn",
    "VIM": "vim",
    "ReAct": "react",
    "ASH": "ash",
    "OpenMax": "openmax",
    "TempScale": "temperature_scaled_msp",
    "Gram": "gram",
    "GradNorm": "grad_norm",
    "KLM": "kl_matching",
    "DICE": "dice",
    "RankFeat": "rank_feat",
    "SHE": "she",
    "SCALE": "scale",
    "fDBD": "fdbd",
    "NCI": "nci",
    "WeiPer+KLD": "weiper_kld",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("clone", type=Path, help="a clone of github.com/zjysteven/OpenOOD")
    parser.add_argument("--commit", required=True, help="the clone's commit (recorded as the source)")
    parser.add_argument("--date", required=True, help="the commit's date, YYYY-MM-DD (recorded)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    benchmarks = {}
    for name, (csv_name, arch, backbone) in BENCHMARKS.items():
        with open(args.clone / "results" / f"{csv_name}.csv", encoding="utf-8") as handle:
            rows = [
                r for r in csv.DictReader(handle) if r["Training"] == "CrossEntropy" and r["Arch"] == arch
            ]
        benchmarks[name] = {
            "csv": f"results/{csv_name}.csv",
            "arch": arch,
            "backbone": backbone,
            "rows": [
                {
                    "postprocessor": r["Postprocessor"],
                    "detector": DETECTORS.get(r["Postprocessor"]),
                    "near_auroc": r["Near-OOD_AUROC"],
                    "far_auroc": r["Far-OOD_AUROC"],
                    "id_accuracy": r["ID_Accuracy"],
                    "description": r["Additional_Description"],
                }
                for r in rows
            ],
        }
    data = {
        "name": "OpenOOD v1.5 leaderboard",
        "source": "https://github.com/zjysteven/OpenOOD (results/*.csv), shown at https://zjysteven.github.io/OpenOOD/",
        "paper": "Zhang et al., OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection, arXiv:2306.09301",
        "commit": args.commit,
        "date": args.date,
        "units": "percent; 'mean ± std' over 3 independent training runs unless a value has no ± (one run)",
        "fpr95": "not published in the leaderboard files; the rows carry AUROC and ID accuracy only",
        "benchmarks": benchmarks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {sum(len(b['rows']) for b in benchmarks.values())} rows")


if __name__ == "__main__":
    main()
