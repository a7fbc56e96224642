"""Does a CLIP trained on `shapes` tell a held-out pair's shape? Not a speed benchmark: the
measurement behind docs/results.md's "held-out compositions are lost first in CLIP".

    .venv/bin/python benchmarks/clip_composition.py RUN [RUN ...]

For each `clip` run folder it reports, on the first 256 one-object images of `validation` (seen
pairs) and of `test_compositional` (every one a held-out pair: purple triangle, yellow square,
cyan circle), CLIP's zero-shot colour and shape against the 18 prompts "a {color} {shape}"
(`demo.shapes.clip_zero_shot`) and linear probes for colour and shape fitted on 1024 seen-pair
train images' embeddings (`demo.shapes.clip_probe`): the same two blocks `split_eval` writes for
the demo's own CLIP. Shape at about 1/3 on test_compositional means the image tower bound shape
to colour. Results: benchmarks/results/clip_composition_cpu.json (one entry per run, keyed by
its folder; a rerun replaces that run's entry and keeps the others).

The runs measured there (all `clip_vit_b32:tiny`, width 64, 2 layers, batch 128, lr 1e-3, on the
50k `shapes` split that `unclip-jax demo --config shapes_quality` prepares):
- outputs/demo_quality/runs/clip: the quality recipe's CLIP, 16 px, patch 4, 1500 steps;
- outputs/clipx/runs/clip: the same run continued to 3000 steps (a warm restart of its cosine
  schedule: `--set stages.clip.steps=3000` on a copy of the output folder);
- outputs/clip32_p8: 32 px, patch 8 (the same 16 tokens), 3000 steps from scratch:
  unclip-jax train --config clip_vit_b32:tiny --workdir outputs/clip32_p8 \\
      --set data.dir=outputs/demo_quality/data --set data.config=default \\
      --set optim.steps=3000 --set optim.batch_size=128 --set optim.lr=1e-3 \\
      --set optim.warmup_steps=100 --set model.vision.image_size=32 --set model.vision.patch_size=8
"""

from __future__ import annotations

import argparse
import json
import pathlib

SPLITS = ("validation", "test_compositional")
OUT = pathlib.Path(__file__).parent / "results" / "clip_composition_cpu.json"


def measure(run: str, count: int, train_count: int) -> dict:
    from unclip_jax.demo import shapes
    from unclip_jax.pipelines.unclip import clip_from_run

    clip = clip_from_run(run)
    vision = clip.image_model.vision
    out = {"step": shapes.latest_step(pathlib.Path(run)), "image_size": vision.image_size,
           "patch_size": vision.patch_size}  # fmt: skip
    probes = shapes.clip_probe(clip, SPLITS, count, train_count)
    for split in SPLITS:
        out[split] = {"zero_shot": shapes.clip_zero_shot(clip, split, count),
                      "probe": probes[split]}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="clip run folders")
    parser.add_argument("--count", type=int, default=256, help="one-object images per split")
    parser.add_argument("--train-count", type=int, default=1024, help="probe training images")
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for run in args.runs:
        results[run] = measure(run, args.count, args.train_count)
        r = results[run]
        print(f"{run} ({r['image_size']} px, patch {r['patch_size']}, step {r['step']}), "
              "shape: zero-shot / probe")  # fmt: skip
        for split in SPLITS:
            print(f"  {split:<19}{r[split]['zero_shot']['shape']:.2f} / "
                  f"{r[split]['probe']['shape']:.2f}")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
