"""Training the joint image-sentence space (model/embedding.py) on cached encoder features, and
measuring it both ways: captions -> photos and photos -> captions, by R@K as the retrieval papers
report them (each caption's one right photo; a photo is found by the best of its captions).

Plain functions, as the decoder's training: `fit` runs the epochs and keeps the best on val by rsum,
`retrieval_ranks` / `recall_both` measure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from captioner.errors import ConfigError
from captioner.model.embedding import EmbeddingConfig, JointEmbedding, SpaceEnsemble
from captioner.model.encoder import weights_digest
from captioner.model.network import load_model, save_space
from captioner.train.checkpoint import load_checkpoint, save_checkpoint
from captioner.train.data import Captions, FeatureRows
from captioner.train.steps import Meter


def word_rows(tokens: list[torch.Tensor], start: int, end: int, pad: int) -> torch.Tensor:
    """Captions as [<start>, w1 .. wn, <end>] id tensors -> (B, T) word ids, padded with `pad`:
    the text side reads the words alone."""
    words = [t[(t != start) & (t != end)] for t in tokens]
    return torch.nn.utils.rnn.pad_sequence(words, batch_first=True, padding_value=pad) if words else torch.zeros(0, 1)


@torch.no_grad()
def embed_rows(fn, items, batch: int = 512) -> torch.Tensor:
    """`fn` over `items` (a tensor or FeatureRows) `batch` rows at a time -> (N, D) float32."""
    out = [fn(items[i:i + batch]).float() for i in range(0, len(items), batch)]
    return torch.cat(out) if out else torch.zeros(0, 1)


def retrieval_ranks(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """img (N, D), txt (M, D) unit vectors, owner (M,) the photo of each caption ->
    (each caption's rank of its photo among the N (1 = first), (M,); each photo's best rank of its own
    captions among the M, (N,)). Rivals tied with the right answer share its places (the mean rank),
    as in evaluate.rank_of: a caption with no known word (a row of zeros) ranks in the middle, not first."""
    sims = txt @ img.t()  # (M, N)
    own = sims.gather(1, owner[:, None])  # (M, 1)
    t2i = (sims > own).sum(dim=1) + 1 + ((sims == own).sum(dim=1) - 1) / 2
    sims_t = sims.t()  # (N, M)
    i2t = torch.full((img.shape[0],), float(txt.shape[0] + 1))
    for i in range(img.shape[0]):
        mine = (owner == i).nonzero().squeeze(1)
        if len(mine):
            best = sims_t[i, mine].max()
            i2t[i] = (sims_t[i] > best).sum() + 1 + ((sims_t[i] == best).sum() - 1) / 2
    return t2i.double().numpy(), i2t.double().numpy()


def recall_both(t2i: np.ndarray, i2t: np.ndarray) -> dict:
    """Ranks both ways -> R@1/5/10 and median rank of each (percent), and rsum (their six R@K)."""
    out = {}
    for name, r in (("text_to_image", t2i), ("image_to_text", i2t)):
        r = np.asarray(r, np.float64)
        out[name] = {f"R@{k}": round(float((r <= k).mean() * 100), 2) for k in (1, 5, 10)} | {
            "median_rank": float(np.median(r))}
    out["rsum"] = round(sum(v for side in ("text_to_image", "image_to_text")
                            for k, v in out[side].items() if k.startswith("R@")), 2)
    return out


def evaluate_space(space: JointEmbedding | SpaceEnsemble, feats: FeatureRows, caps: Captions, start: int,
                   end: int) -> dict:
    """R@K both ways over the val photos `feats` and their captions `caps`."""
    space.eval()
    img = embed_rows(space.images, feats)
    txt = embed_rows(space.texts, word_rows(caps.tokens, start, end, space.pad))
    return recall_both(*retrieval_ranks(img, txt, caps.image))


@torch.no_grad()
def calibrate(space: JointEmbedding | SpaceEnsemble, feats: FeatureRows, caps: Captions, start: int,
              end: int) -> tuple[float, ...]:
    """The cosines of the val captions with their own photos at the 0th, 5th, ... 100th percentile:
    what a right answer scores (EmbeddingConfig.calibration)."""
    space.eval()
    img = embed_rows(space.images, feats)
    txt = embed_rows(space.texts, word_rows(caps.tokens, start, end, space.pad))
    own = (txt * img[caps.image]).sum(dim=1).numpy()
    return tuple(round(float(x), 4) for x in np.percentile(own, np.arange(0, 101, 5)))


def fit(space: JointEmbedding, train: tuple[FeatureRows, Captions], val: tuple[FeatureRows, Captions], *,
        start: int, end: int, epochs: int = 20, batch_size: int = 256, lr: float = 4e-4, weight_decay: float = 1e-4,
        seed: int = 0, flipped: FeatureRows | None = None, mirror: dict[int, int] | None = None,
        state: dict | None = None, save: Callable[[dict], None] | None = None, progress: bool = True,
        log=print) -> dict:
    """Train `space` for `epochs` over every training caption (each with its photo), Adam at `lr`
    with a cosine decay, and keep the weights of the epoch with the best val rsum. Returns
    {"best_epoch", "val": that epoch's recall_both, "history": [(epoch, loss, rsum), ...]}.

    `flipped`: the training photos' features mirrored left to right, row for row with train's. Each
    caption then meets its photo mirrored half of the time, with the words of `mirror` ({id of
    "left": id of "right", and back, in every language of `mirror_words`}) swapped: 6,000 photos
    are memorised in 3-4 epochs, and a second view of each lifted a space's val rsum by 2.6 and 6.3
    in two seeds (docs/EXPERIMENTS.md).

    `save(state)` is called after every epoch with where the training stands (weights, optimizer,
    scheduler, random states, the best epoch so far: tensors and plain data); `state`, such a dict,
    makes a killed fit go on after its last finished epoch, to the same weights as without the kill."""
    feats, caps = train
    gen = torch.Generator().manual_seed(seed)
    words = word_rows(caps.tokens, start, end, space.pad)  # (N, T)
    mirrored = words.clone()  # (N, T): the words as a mirrored photo's caption says them
    for a, b in (mirror or {}).items():
        mirrored[words == a] = b
    n = len(caps.tokens)
    steps_per_epoch = max(1, n // batch_size)
    opt = torch.optim.AdamW(space.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / (epochs * steps_per_epoch)))))
    best, best_state, history, first = None, None, [], 1
    if state is not None:
        space.load_state_dict(state["space"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"])  # dropout's
        history, first = [tuple(h) for h in state["history"]], state["epoch"] + 1
        best, best_state = (state["best_epoch"], state["best_scores"]), state["best_state"]
    for epoch in range(first, epochs + 1):
        space.train()
        order = torch.randperm(n, generator=gen)
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(steps_per_epoch)]
        meter = Meter(batches, f"search space, epoch {epoch} of {epochs}", total=len(batches), progress=progress)
        t0 = time.perf_counter()
        for idx in meter:
            rows = caps.image[idx]
            f, w = feats[rows.numpy()], words[idx]
            if flipped is not None:  # half the captions meet their photo mirrored
                flip = torch.rand(len(idx), generator=gen) < 0.5
                f[flip] = flipped[rows[flip].numpy()]
                w = torch.where(flip[:, None], mirrored[idx], w)
            w = w[:, : int((w != space.pad).sum(dim=1).max())]  # drop all-padding columns
            loss = space.loss(space.images(f), space.texts(w), same=rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(space.parameters(), 2.0)
            opt.step()
            sched.step()
            meter.add("loss", loss.item() * len(idx), len(idx))
            meter.show(len(idx), "captions/s", loss=".3f")
        scores = evaluate_space(space, val[0], val[1], start, end)
        history.append((epoch, round(meter.mean("loss"), 4), scores["rsum"]))
        log(f"search space, epoch {epoch} of {epochs}: loss {meter.mean('loss'):.4f}, val rsum {scores['rsum']:.1f} "
            f"(text->image R@1 {scores['text_to_image']['R@1']:.1f}), {time.perf_counter() - t0:.0f} s")
        if best is None or scores["rsum"] > best[1]["rsum"]:
            best = (epoch, scores)
            best_state = {k: v.detach().clone() for k, v in space.state_dict().items()}
        if save is not None:
            save({"epoch": epoch, "space": space.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "generator": gen.get_state(), "rng": torch.get_rng_state(),
                  "history": history, "best_epoch": best[0], "best_scores": best[1], "best_state": best_state})
    if best_state is not None:
        space.load_state_dict(best_state)
    space.eval()
    return {"best_epoch": best[0] if best else 0, "val": best[1] if best else None, "history": history}


def new_space(cfg: EmbeddingConfig, pad: int, word_vectors: torch.Tensor | None = None,
              seed: int = 0) -> JointEmbedding:
    """A space to train, its word vectors copied from the captioner's (V, E) when given and sized alike."""
    torch.manual_seed(seed)
    space = JointEmbedding(cfg, pad)
    if word_vectors is not None and tuple(word_vectors.shape) == tuple(space.words.weight.shape):
        with torch.no_grad():
            space.words.weight.copy_(word_vectors)
    return space


# The words a caption says "left" and "right" with, which trade places when its photo is mirrored,
# in the languages people caption in most (Chinese and Japanese: one character each, as tokenized).
# A pair counts only when the vocabulary has both words: an English set's "links" (golf links),
# without "rechts", stays as it is.
MIRROR_PAIRS = (("left", "right"), ("links", "rechts"), ("linke", "rechte"), ("linken", "rechten"),
                ("linker", "rechter"), ("linkes", "rechtes"), ("gauche", "droite"), ("izquierda", "derecha"),
                ("sinistra", "destra"), ("esquerda", "direita"), ("слева", "справа"), ("左", "右"))


def mirror_words(stoi: dict[str, int]) -> dict[int, int]:
    """{id of a word: id of its mirror} for every pair of MIRROR_PAIRS the vocabulary `stoi` has."""
    return {stoi[a]: stoi[b] for pair in MIRROR_PAIRS if all(w in stoi for w in pair)
            for a, b in (pair, pair[::-1])}


def add_space(folders: list[Path], train: tuple[FeatureRows, Captions], val: tuple[FeatureRows, Captions],
              epochs: int, *, members: int = 1, seed: int = 0, flipped: FeatureRows | None = None,
              checkpoint: Path | None = None, progress: bool = True, log=print) -> dict:
    """Train the search space of the model in `folders[0]` on cached features and captions (the
    (FeatureRows, Captions) of each split) and add it to every folder of `folders` (they share its
    encoder and vocabulary: a run's best/ and last/). With `members` > 1, that many spaces are
    trained, from seeds `seed`, `seed` + 1, ..., and kept as one SpaceEnsemble. `flipped`: the
    training photos' mirrored features (`fit`). Returns `fit`'s result, its "val" the whole space's.

    `checkpoint`: a file where the training stands after every epoch (the members finished, and the
    one in training), removed once the space is saved. Found there at the start, it is continued:
    a killed run loses one epoch at most, and ends with the same space (the shipped model's two
    members train for 20 minutes on one thread)."""
    model, vocab = load_model(folders[0])
    words = model.decoder.word_vectors("input")  # (V, E): the text side starts from the captioner's words
    mirror = mirror_words(vocab.stoi)
    cfg = EmbeddingConfig(vocab_size=len(vocab), feat_dim=model.cfg.feat_dim, word_dim=words.shape[1],
                          members=members)
    # what the saved training must have been, for it to be continued
    settings = {"epochs": epochs, "members": members, "seed": seed, "mirrored": flipped is not None,
            "captions": len(train[1].tokens), "val captions": len(val[1].tokens),
            "model": weights_digest(model.decoder)}
    done, current = _saved_space(checkpoint, settings, log)
    trained, results = [], []
    for k in range(members):
        if members > 1:
            log(f"search space: member {k + 1} of {members} (seed {seed + k})")
        trained.append(new_space(cfg, vocab.pad, words, seed=seed + k))
        if k < len(done):  # finished before the run was stopped
            trained[-1].load_state_dict(done[k]["space"])
            results.append(done[k]["result"])
            continue

        def save(state: dict) -> None:
            save_checkpoint(checkpoint, {"settings": settings, "done": done, "current": state})

        results.append(fit(trained[-1], train, val, start=vocab.start, end=vocab.end, epochs=epochs, seed=seed + k,
                           flipped=flipped, mirror=mirror, state=current, save=save if checkpoint else None,
                           progress=progress, log=log))
        done.append({"space": trained[-1].state_dict(), "result": results[-1]})
        current = None
    space = trained[0] if members == 1 else SpaceEnsemble(cfg, vocab.pad, trained).eval()
    result = results[0] if members == 1 else {
        "best_epoch": [r["best_epoch"] for r in results], "history": [r["history"] for r in results],
        "members": [r["val"] for r in results], "val": evaluate_space(space, val[0], val[1], vocab.start, vocab.end)}
    space.cfg.calibration = calibrate(space, val[0], val[1], vocab.start, vocab.end)
    for folder in folders:
        save_space(space, folder)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    t2i, i2t = result["val"]["text_to_image"], result["val"]["image_to_text"]
    best = ", ".join(str(r["best_epoch"]) for r in results)
    log(f"search space: best at epoch{'s' if members > 1 else ''} {best} of {epochs}"
        f"{f', its {members} members together' if members > 1 else ''}: val text->image R@1/5/10 "
        f"{t2i['R@1']:.1f}/{t2i['R@5']:.1f}/{t2i['R@10']:.1f}, image->text {i2t['R@1']:.1f}/{i2t['R@5']:.1f}/"
        f"{i2t['R@10']:.1f}; added to {', '.join(str(f) for f in folders)}")
    return result


def _saved_space(checkpoint: Path | None, settings: dict, log) -> tuple[list[dict], dict | None]:
    """The members finished and the state of the one in training in `checkpoint` (add_space), or
    ([], None) when there is none. One saved by a training of other settings is refused in one line:
    continuing it would make a space that is neither."""
    if checkpoint is None or not checkpoint.is_file():
        return [], None
    saved = load_checkpoint(checkpoint, needed={"settings", "done", "current"})
    if saved["settings"] != settings:
        changed = "; ".join(f"{k} {v} here, {saved['settings'].get(k)} there" for k, v in settings.items()
                            if saved["settings"].get(k) != v)
        raise ConfigError(f"{checkpoint}: a search space's training with other settings or data ({changed}); "
                          "continue it with its own, or start a new run")
    done, current = list(saved["done"]), saved["current"]
    log(f"search space: continuing the training saved in {checkpoint}: {len(done)} of {settings['members']} "
        f"member{'s' if settings['members'] > 1 else ''} finished"
        + (f", member {len(done) + 1} after epoch {current['epoch']} of {settings['epochs']}" if current else ""))
    return done, current
