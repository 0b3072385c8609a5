"""One epoch of training, one validation, and the choice of decoding at the end of a run.

Validation is honest: val loss (teacher-forced, as a loss only) and free-running captions of every
val image, scored with BLEU-4 and CIDEr-D against all of its references; never teacher-forced
"BLEU".
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch

from captioner import metrics
from captioner.data.batching import LengthBucketSampler
from captioner.data.records import MIN_VAL_PHOTOS
from captioner.data.vocab import Vocabulary
from captioner.decode import caption_features
from captioner.decoding import Decoding, Naming
from captioner.distributed import Dist
from captioner.errors import CaptionerWarning, TrainingError
from captioner.inference.plan import InferencePlan
from captioner.model.network import CaptionModel, load_model, save_model
from captioner.runtime import encoder_memory_format
from captioner.tags import Tagger, naming_of, pooled
from captioner.train.data import Captions, FeatureRows
from captioner.train.steps import Meter, Steps, Warmup, caption_loss


def train_one_epoch(model, batches, optimizer, plan: InferencePlan, clip: float, epoch: int, pad: int,
                    images: bool = False, progress: bool = True, dist: Dist | None = None, accum: int = 1,
                    total: int | None = None, freeze_bn: bool = False, warmup: Warmup | None = None,
                    memory_format: torch.memory_format | None = None, epochs: int | None = None) -> float:
    """`batches` yields (features, tokens) of one length each, or ImageBatch when `images` (the
    encoder is trained too). `model` is a CaptionModel, or its DistributedDataParallel wrapper.
    Every `accum` batches make one optimiser step on the mean of their losses (gradient
    accumulation; the sampler makes the number of batches a multiple of it). `pad`: the
    vocabulary's padding id, which the loss ignores. `total`: how many batches there are, for the
    progress bar. Returns the mean cross-entropy per word (over all ranks).

    With `images`, BatchNorm layers of frozen encoder stages keep their running statistics, and
    with `freeze_bn` so do all of the encoder's (their scale and shift still learn). `warmup`
    ramps a learning rate up over the first steps (see Warmup). `memory_format`: how the images are
    laid out, which must be how the encoder's weights are (default: runtime.encoder_memory_format)."""
    dist = dist or Dist()
    core = getattr(model, "module", model)
    model.train()
    if not images:
        core.encoder.eval()  # frozen: keep its BatchNorm statistics fixed
    else:
        for m in core.encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                    freeze_bn or not any(p.requires_grad for p in m.parameters())):
                m.eval()
    device = plan.device
    memory_format = memory_format or encoder_memory_format(device)
    steps = Steps(optimizer, plan, clip, accum, warmup, dist)
    meter = Meter(batches, f"epoch {epoch}" + (f" of {epochs}" if epochs else ""), total=total, progress=progress,
                  dist=dist)
    for i, batch in enumerate(meter):
        rows = lengths = None
        if images:  # an ImageBatch: each image once, its captions padded, longest first
            for error in batch.errors:
                warnings.warn(f"left out of this epoch: {error}", CaptionerWarning, stacklevel=2)
            if not len(batch.rows):  # no image of the batch could be read
                continue
            x, tok = batch.images.to(device, non_blocking=True, memory_format=memory_format), batch.tokens
            rows, lengths = batch.rows.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True)
        else:
            x, tok = batch
            x = x.to(device, non_blocking=True)
        tok = tok.to(device, non_blocking=True)
        due = steps.due(i)
        # DDP averages gradients over ranks on the backward pass of a step's last batch only
        sync = contextlib.nullcontext() if due or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with plan.autocast():
                logits, penalty = model(x, tok[:, :-1], images=images, rows=rows, lengths=lengths)  # (B, T-1, V)
            loss = caption_loss(logits, tok[:, 1:], pad)
            steps.backward(loss + penalty.float())
        if due:
            steps.step()
        n = tok[:, 1:].ne(pad).sum().item()
        value = loss.item()
        if not math.isfinite(value):  # a model trained on from here is garbage, and would be saved as such
            hint = " (fp16 can overflow: try --precision bf16 or fp32)" if plan.precision == "fp16" else ""
            raise TrainingError(f"the loss became {value} at epoch {epoch}, batch {i + 1}: stopped, and what was "
                                f"saved before is kept. Broken features or too high a learning rate?{hint}")
        meter.add("loss", value * n, n)
        meter.show(tok.shape[0] * dist.world, "cap_s", loss=".3f")
    return meter.totals().get("loss", 0.0)


def val_decoding(beam_size: int, max_len: int) -> Decoding:
    """How validation decodes: greedy, or beam search with length normalisation 1.0."""
    return Decoding(beam_size=beam_size, length_norm=1.0 if beam_size > 1 else 0.0, max_len=max_len)


@torch.no_grad()
def validate(model: CaptionModel, vocab: Vocabulary, feats: FeatureRows, caps: Captions, scorer: metrics.Scorer,
             plan: InferencePlan, decoding: Decoding, batch_size: int = 256) -> dict:
    """Val loss (teacher-forced, as a loss only) and free-running captions of every val image
    (with `decoding`) scored with BLEU-4 and CIDEr-D against all of its references."""
    model.eval()
    total, n_tok = 0.0, 0
    for idx in LengthBucketSampler(caps.lengths, batch_size, shuffle=False):
        rows, tok = caps.batch(idx)
        f, tok = feats[rows].to(plan.device).float(), tok.to(plan.device)
        with plan.autocast():
            logits, _ = model(f, tok[:, :-1])  # features, not images
        n = tok[:, 1:].ne(vocab.pad).sum().item()
        total += caption_loss(logits, tok[:, 1:], vocab.pad).item() * n
        n_tok += n
    hyps = [r["caption"] for r in caption_features(model.decoder, vocab, feats, decoding, plan,
                                                   batch_size if decoding.beam_size == 1 else 100)]
    s = scorer(dict(enumerate(hyps)), meteor=False)
    return {"val_loss": total / max(n_tok, 1), "BLEU-4": s["BLEU-4"], "CIDEr": s["CIDEr"], "samples": hyps[:3]}


# (beam size, length norm, no repeated trigrams). Beam 5 with trigrams blocked scored best for the
# shipped model on val, in fp32 and bf16 alike (docs/EXPERIMENTS.md); greedy and beam 3 stay for smaller models.
DECODING_CANDIDATES = ((1, 0.0, False), (3, 0.0, False), (3, 0.5, False), (3, 1.0, False), (3, 1.5, False),
                       (3, 2.0, False), (3, 1.5, True), (5, 1.0, True), (5, 1.5, True))


def choose_decoding(folder: Path, feats: FeatureRows, scorer: metrics.Scorer, plan: InferencePlan,
                    half: bool = False, keep: bool = False) -> list[dict]:
    """Score the model folder's captions of val with each candidate decoding and store the best
    (by CIDEr-D) in its decoding.json as the model's default. Returns one row per candidate, the
    chosen one with "chosen": True. Tag guidance stays as the folder has it.

    With `keep` (a model fine-tuned from another, whose decoding was chosen on more data), the
    folder's own decoding is scored too and stays unless another one is clearly better: ahead in at
    least KEEP_CONFIDENCE of KEEP_RESAMPLES paired resamples of at least MIN_VAL_PHOTOS val photos
    (a resample of a handful of photos is sure of anything). A val set of 18
    photos once swapped beam 5 with trigram blocking for beam 3 without, and "on a skateboard on a
    skateboard" came back."""
    model, vocab = load_model(folder, plan.device)
    own = model.decoding
    candidates = list(DECODING_CANDIDATES)
    if keep and (own.beam_size, own.length_norm, own.block_trigrams) not in candidates:
        candidates.append((own.beam_size, own.length_norm, own.block_trigrams))
    rows, each = [], []
    for beam_size, length_norm, block in candidates:
        decoding = Decoding(beam_size=beam_size, length_norm=length_norm, block_trigrams=block,
                            max_len=model.cfg.max_len)
        hyps = dict(enumerate(r["caption"] for r in caption_features(model.decoder, vocab, feats, decoding, plan)))
        s = scorer(hyps, meteor=False, per_image=True)
        each.append(s["CIDEr_per_image"])
        rows.append({"beam_size": beam_size, "length_norm": length_norm, "block_trigrams": block,
                     "BLEU-4": round(s["BLEU-4"], 4), "CIDEr": round(s["CIDEr"], 4)})
    best = max(range(len(rows)), key=lambda i: rows[i]["CIDEr"])
    if keep:
        mine = candidates.index((own.beam_size, own.length_norm, own.block_trigrams))
        if best != mine and (len(each[mine]) < MIN_VAL_PHOTOS
                             or clearly_better(each[best], each[mine]) < KEEP_CONFIDENCE):
            best = mine
    rows[best]["chosen"] = True
    model.decoding = own.replace(beam_size=rows[best]["beam_size"], length_norm=rows[best]["length_norm"],
                                 block_trigrams=rows[best]["block_trigrams"])
    model.cfg.extra = {**model.cfg.extra, "decoding_on_val": rows}
    save_model(model, vocab, folder, half=half)
    return rows


def count_naming(encoder: str, vocab: Vocabulary, feats: FeatureRows, caps: Captions) -> Naming | None:
    """How often the training captions `caps` said the tag words of their photos (`feats`, the
    pretrained encoder's cached features): what a model folder's naming.json holds, which tag
    guidance reads (decoding.Naming). None for an encoder without an ImageNet classifier."""
    tagger = Tagger.for_encoder(encoder)
    if tagger is None:
        return None
    probs = torch.cat([tagger.probs(pooled(feats[i:i + 256].float())) for i in range(0, len(feats), 256)])
    refs: list[list[set[int]]] = [[] for _ in range(len(feats))]
    for tokens, row in zip(caps.tokens, caps.image.tolist()):
        refs[row].append(set(tokens.tolist()))
    return naming_of(tagger, probs, refs, vocab)


KEEP_RESAMPLES, KEEP_CONFIDENCE = 1000, 0.95


def clearly_better(a: list[float], b: list[float], resamples: int = KEEP_RESAMPLES, seed: int = 0) -> float:
    """How often `a`'s mean beats `b`'s over paired bootstrap resamples of the same photos (a paired
    bootstrap test: 0.95 and up is a difference the val set can tell apart)."""
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if not len(diff):
        return 0.0
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=g)
    return float((diff[picks].mean(1) > 0).double().mean())
