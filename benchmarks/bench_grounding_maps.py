"""Which grounding map points? Every map of `mpma_ds.eval.grounding_maps` scored against the truth boxes, for a
pretrained model and its random twin (one process).

Pretrains the demo's recipe (`pretrain_tiny`: `mpma_tiny`, `align_on: full`) for `--steps` on `--shards` (or
takes an exported `--model`), then plays the pointing game, CNR and IoU of each map (the local alignment's
similarity, the fusion's text->image cross-attention averaged and rolled out, Grad-CAM of the contrastive
score, the GLoRIA loss's attention for a model trained with `local_loss: gloria`, and Grad-CAM of the ITM score
when the model has that head, and the similarity with the location prior taken out: `eval.prior_maps`, its
prior fitted on `--prior-batches` of `--prior-split`, each model its own) on the validation split, each with its
bootstrap 95 % interval, the shifted-pair baseline (each map against the next pair's box: what a location prior
alone scores) and the box-area chance; the same for a randomly initialised twin. Writes overlays of the best map (the pretrained model's highest
pointing game), pretrained | random side by side, to `--out-dir/overlays/`.

    python benchmarks/bench_grounding_maps.py --shards demo_runs/shards --tokenizer demo_runs/tokenizer --steps 300
    python benchmarks/bench_grounding_maps.py --shards demo_runs/shards --model demo_runs/exported

Writes `--out-dir/bench_grounding_maps.json` (default benchmarks/results/) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from mpma_ds import MPMA, load_tokenizer
from mpma_ds.eval.grounding import GroundingExample, stored_sizes, write_overlays
from mpma_ds.eval.grounding_maps import available_maps, collect_map_pairs, format_map_table, map_metrics
from mpma_ds.eval.prior_maps import attach_prior, fit_prior
from mpma_ds.runner.evaluate import data_config_for, one_pass, split_folder
from mpma_ds.tracking.params import json_safe


def pretrain(args: argparse.Namespace, out: Path) -> Path:
    """The demo's recipe for ``--steps`` in this process (one rank); returns the exported folder."""
    from mpma_ds.recipes import find_recipe
    from mpma_ds.runner.export import export_checkpoint
    from mpma_ds.runner.trainer import train
    from mpma_ds.training import load_recipe

    shards = Path(args.shards)
    overrides = [
        f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'validate'}",
        f"data.tokenizer={args.tokenizer}", f"train.output_dir={out / 'pretrain'}", f"train.max_steps={args.steps}",
        f"train.warmup_steps={max(1, min(30, args.steps // 10))}", "train.save_every=0", "train.eval_every=0",
        f"train.seed={args.seed}", "tracking.enabled=false", *args.set,
    ]  # fmt: skip
    recipe = load_recipe(find_recipe("pretrain_tiny"), overrides)
    start = time.perf_counter()
    train(recipe, overwrite=True)
    print(f"pretrained {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    return export_checkpoint(out / "pretrain", out / "exported", overwrite=True)


def examples(pairs, name: str, image_of: dict, n: int) -> list[GroundingExample]:
    """The first ``n`` pairs of ``pairs`` as overlay examples of map ``name``."""
    from mpma_ds.eval.grounding import pointing_hit

    out = []
    for i in range(min(n, len(pairs.boxes))):
        grid = pairs.grids[name][i]
        hit = pointing_hit(grid, pairs.boxes[i], pairs.size)
        out.append(GroundingExample(pairs.keys[i], pairs.findings[i], pairs.phrases[i], image_of[pairs.keys[i]],
                                    grid.numpy(), pairs.boxes[i], hit))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard build folder (train/ and validate/ inside)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL/text_encoder)")
    p.add_argument("--model", help="an exported model folder (default: pretrain one for --steps)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps without --model (default 300)")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides of the pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only this many batches (0 = all)")
    p.add_argument("--maps", nargs="*", help="score only these maps (default: every map the model can give)")
    p.add_argument("--prior-split", default="train", help="the films the prior maps' prior is fitted on")
    p.add_argument(
        "--prior-batches", type=int, default=16, help="batches of --prior-split to fit it on (0 = none)"
    )
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--overlays", type=int, default=8)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else pretrain(args, out / "bench_grounding_maps")
    tok_dir = args.tokenizer or str(model_dir / "text_encoder")
    tok = load_tokenizer(tok_dir)
    pretrained = MPMA.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    random = MPMA(pretrained.config)  # the twin: the same architecture, randomly initialised
    shard_dir = split_folder(args.shards, "validate")
    cfg = data_config_for(pretrained.config, recipe=None, shards=shard_dir, tokenizer=tok_dir, backend="wds")
    from mpma_ds.runner.export import load_run_recipe

    if (model_dir / "recipe.yaml").is_file():  # the training preprocessing (image size, normalisation)
        cfg = data_config_for(pretrained.config, recipe=load_run_recipe(model_dir / "recipe.yaml"),
                              shards=shard_dir, tokenizer=tok_dir, backend="wds")  # fmt: skip
    sizes = stored_sizes(shard_dir)
    prior_cfg = dataclasses.replace(cfg, **{f"{s}_shards": str(split_folder(args.shards, args.prior_split))
                                            for s in ("train", "val", "test")})  # fmt: skip
    results, found = {}, {}
    mean, std = cfg.channel_stats()
    image_of: dict = {}
    for name, net in (("pretrained", pretrained), ("random", random)):
        start = time.perf_counter()
        if args.prior_batches:  # each model's own prior, on films the maps are not scored on
            with one_pass(prior_cfg, tok, split="validate", batch_size=args.batch_size,
                          max_batches=args.prior_batches) as b:  # fmt: skip
                attach_prior(net, fit_prior(net, (batch["image"] for batch in b)))
            print(f"{name}: prior fitted on {net.grounding_prior.films} films of {args.prior_split}", flush=True)
        maps = [m for m in available_maps(net) if not args.maps or m in args.maps]
        with one_pass(
            cfg, tok, split="validate", batch_size=args.batch_size, max_batches=args.max_batches or None
        ) as b:

            def keep_images(batches):
                for batch in batches:
                    for k, img in zip(batch["key"], batch["image"]):
                        if len(image_of) < 4 * args.overlays and k not in image_of:
                            image_of[k] = (img[0].float() * std[0] + mean[0]).clamp(0, 1).numpy()
                    yield batch

            found[name] = collect_map_pairs(net, keep_images(b), tokenizer=tok, data_cfg=cfg, sizes=sizes,
                                            maps=maps)  # fmt: skip
        results[name] = map_metrics(found[name], n_resamples=args.bootstrap, seed=args.seed)
        print(f"{name}: {len(found[name].boxes)} pairs, {time.perf_counter() - start:.0f} s", flush=True)
    best = max(results["pretrained"], key=lambda m: results["pretrained"][m]["pointing_game"])
    print(format_map_table(results))
    print(f"best map (pretrained pointing game): {best}")
    shown = [i for i, k in enumerate(found["pretrained"].keys) if k in image_of][: args.overlays]
    if shown:
        write_overlays(out / "bench_grounding_maps" / "overlays", {
            name: [e for i, e in enumerate(examples(found[name], best, image_of, max(shown) + 1)) if i in shown]
            for name in ("pretrained", "random")
        })  # fmt: skip
    priors = {n: getattr(m, "grounding_prior", None) for n, m in (("pretrained", pretrained), ("random", random))}
    record = {"args": vars(args), "model": str(model_dir), "best_map": best, "results": results,
              "prior_films": {n: p.films if p is not None else None for n, p in priors.items()}}  # fmt: skip
    (out / "bench_grounding_maps.json").write_text(json.dumps(json_safe(record), indent=1) + "\n")
    print(f"results: {out / 'bench_grounding_maps.json'}; overlays: {out / 'bench_grounding_maps' / 'overlays'}")


if __name__ == "__main__":
    main()
