"""From encoder features to captions, shared by every decoder and every caller.

    (Decoding, the settings of a search, is decoding.py's: one frozen value, from the model's
    config.json with the caller's changes)
    caption_features   features -> captions with alternatives and log-probabilities; the one
                       road training, evaluation, the Python API and the server all take
    search             greedy when beam_size is 1, else batched beam search
    sample             captions drawn from the model, with their graph (self-critical training)

The searches use the decoder contract of model/base.py (``start``, ``step``, ``select``) and run
the whole batch at once: beam search keeps B*K rows (B images, K beams, image b's beams in rows
b*K .. b*K+K-1), never a loop per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captioner.decoding import MAX_TAG_WORDS, Decoding
from captioner.errors import ConfigError
from captioner.inference.plan import InferencePlan
from captioner.model.base import image_rows

NEG_INF = float("-inf")
Constraint = Sequence[Sequence[int]]  # one image's: sets of word ids, one word of each to be said


@dataclass
class Hypotheses:
    """Search results for B images and K alternatives each, best first."""

    tokens: torch.Tensor  # (B, K, L) word ids, each row ending in <end> (padded with <end>)
    logprob: torch.Tensor  # (B, K) summed log-probability including <end>
    score: torch.Tensor  # (B, K) the ranking score (logprob / length**alpha)


@torch.no_grad()
def caption_features(decoder, vocab, feats, decoding: Decoding, plan: InferencePlan, batch_size: int = 100,
                     constraints: Sequence[Constraint] | None = None) -> list[dict]:
    """Captions of every row of `feats` (a tensor, or anything with len() and slicing that gives
    tensors, such as training's memory-mapped feature rows), in order, `batch_size` rows a search:

        [{"caption": str, "logprob": float, "score": float,
          "alternatives": [{"caption", "logprob", "score"}, ...]}, ...]

    `alternatives` holds the K beams (one for greedy), best first: in the order of `score`, the
    search's ranking (logprob / length**length_norm, counting <end>; the logprob itself when length
    normalisation is off), so a longer caption can come first with a lower logprob.

    `constraints`: for each row, the words its caption must say (see search; tags.py chooses them).

    `plan` says how the search runs on its device: the decoder's precision for a batch of that size
    (InferencePlan.decoder_precision), how often to ask whether every caption has ended, whether
    ended images leave the batch. Every caller passes its plan, so the same image gets the same
    caption from the command line, the API, the server, evaluation and training's validation.
    (Captioning on the CPU packs the decoder's weights, inference/packed.py; training does not.
    The results are the same in bf16 and the same up to rounding in fp32.)"""
    decoder.eval()
    out: list[dict] = []
    for i in range(0, len(feats), batch_size):
        f = feats[i:i + batch_size].to(plan.device).float()
        with plan.decoder_autocast(f.shape[0]):
            hyp = search(decoder, f, vocab, decoding, check_every=plan.check_every, drop_finished=plan.drop_finished,
                         constraints=None if constraints is None else constraints[i:i + batch_size])
        out += _results(hyp, vocab)
    return out


def _results(hyp: Hypotheses, vocab) -> list[dict]:
    tokens, logprob, score = hyp.tokens.tolist(), hyp.logprob.float().cpu(), hyp.score.float().cpu()
    results = []
    for b in range(len(tokens)):
        alts = [{"caption": vocab.decode(tokens[b][k]), "logprob": round(float(logprob[b, k]), 4),
                 "score": round(float(score[b, k]), 4)}
                for k in range(len(tokens[b])) if torch.isfinite(logprob[b, k])]
        results.append({**alts[0], "alternatives": alts})
    return results


@torch.no_grad()
def search(decoder, feats: torch.Tensor, vocab, decoding: Decoding | None = None, *, check_every: int = 1,
           drop_finished: bool = True, constraints: Sequence[Constraint] | None = None) -> Hypotheses:
    """Caption a batch of features: greedy when `decoding.beam_size` is 1, else beam search.
    `vocab` gives the <start>/<end> ids; the words of `never_said` are never produced.
    `check_every`, `drop_finished`: see beam_search (their values are the caller's plan's).

    `constraints`: for each image, the words its caption must contain, as sets of word ids of
    which one will do ([{id of "cat", id of "cats"}]); none for an image: searched as without.
    Images are searched in groups of the same number of sets, so those without any cost what they
    cost unconstrained, and the others carry only the beams their own constraints need."""
    d = decoding or Decoding()
    counts = [len(c) for c in constraints] if constraints is not None else []
    if any(counts):
        return _by_constraint_count(decoder, feats, vocab, d, constraints, counts, check_every, drop_finished)
    if d.beam_size == 1:
        return greedy(decoder, feats, vocab.start, vocab.end, d.max_len, banned=never_said(vocab),
                      check_every=check_every, drop_finished=drop_finished)
    return beam_search(decoder, feats, vocab.start, vocab.end, d.max_len, d.beam_size, d.length_norm,
                       d.block_trigrams, banned=never_said(vocab), check_every=check_every,
                       drop_finished=drop_finished)


def _by_constraint_count(decoder, feats, vocab, d: Decoding, constraints, counts, check_every, drop_finished
                         ) -> Hypotheses:
    """search() with constraints: one search per number of constraint sets, results in order."""
    if max(counts) > MAX_TAG_WORDS:
        raise ConfigError(f"a caption can be asked to say at most {MAX_TAG_WORDS} words, not {max(counts)}")
    B, dev = feats.shape[0], feats.device
    K = d.beam_size
    out = Hypotheses(torch.full((B, K, d.max_len + 1), vocab.end, dtype=torch.long, device=dev),
                     torch.full((B, K), NEG_INF, device=dev), torch.full((B, K), NEG_INF, device=dev))
    for c in sorted(set(counts)):
        rows = [i for i, n in enumerate(counts) if n == c]
        idx = torch.tensor(rows, device=dev)
        if c == 0:
            hyp = search(decoder, feats[idx], vocab, d, check_every=check_every, drop_finished=drop_finished)
        else:
            bits = torch.zeros(len(rows), len(vocab), dtype=torch.long)  # bit k: the word satisfies set k
            for r, i in enumerate(rows):
                for k, words in enumerate(constraints[i]):
                    bits[r, list(words)] |= 1 << k
            hyp = beam_search(decoder, feats[idx], vocab.start, vocab.end, d.max_len, d.beam_size, d.length_norm,
                              d.block_trigrams, banned=never_said(vocab), check_every=check_every,
                              drop_finished=drop_finished, constraints=bits.to(dev), n_constraints=c)
        k = hyp.tokens.shape[1]  # greedy gives one caption an image, a beam of K gives K
        out.tokens[idx, :k], out.logprob[idx, :k], out.score[idx, :k] = hyp.tokens, hyp.logprob, hyp.score
    return out


def never_said(vocab) -> list[int]:
    """Ids no caption may contain: <unk> (a caption saying "<unk>" helps no one), and <pad> and
    <start>, which are not words (a barely trained model can put them anywhere; they would be
    dropped from the text but counted in its length and log-probability)."""
    return [vocab.pad, vocab.start, vocab.unk]


def log_probs(logits: torch.Tensor, banned: Sequence[int] | torch.Tensor = (), temperature: float = 1.0
              ) -> torch.Tensor:
    """Log-probabilities of the next word with `banned` words removed *before* normalising, so the
    distribution is the model's over the allowed words. (Removing them afterwards would leave their
    mass in the normaliser; self-critical training then pushes ever more mass onto a word it never
    samples, until every allowed word's probability underflows to zero.)"""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature  # x / 1 is x: no pass for it
    if len(banned):
        logits = logits.index_fill(1, _on(banned, logits.device), NEG_INF)
    return F.log_softmax(logits, dim=-1)


def _on(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Word ids as a tensor on `device`. The searches make it once, not at every step: on a GPU each
    copy from the host's memory waits for the device."""
    return ids.to(device) if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long,
                                                                                device=device)


def _only_end(logp: torch.Tensor, eos: int) -> None:
    """Out of room: only <end> may follow. It keeps its real log-probability, so a caption cut at
    the maximum length is ranked as the model scores it, not given its ending for free."""
    end = logp[:, eos].clone()
    logp.fill_(NEG_INF)
    logp[:, eos] = end


@torch.no_grad()
def greedy(decoder, feats: torch.Tensor, bos: int, eos: int, max_len: int,
           banned: Sequence[int] = (), check_every: int = 1, drop_finished: bool = True) -> Hypotheses:
    """Take the most likely word at each step; at most `max_len` words, then <end>. Whether
    captions have ended is asked every `check_every` steps (InferencePlan.check_every); then
    the ended ones leave the batch (the steps after cost only the others; `drop_finished=False`
    keeps them, for comparison), and the search stops when none is left. The steps an
    ended caption runs before that change nothing."""
    B = feats.shape[0]
    banned = _on(banned, feats.device)
    state = decoder.start(feats)
    tokens = torch.full((B,), bos, dtype=torch.long, device=feats.device)
    out = torch.full((B, max_len + 1), eos, dtype=torch.long, device=feats.device)
    logprob = torch.zeros(B, device=feats.device)
    ids = torch.arange(B, device=feats.device)  # each caption still in the batch: its row of `out`
    finished = torch.zeros(B, dtype=torch.bool, device=feats.device)
    for t in range(max_len + 1):
        logits, state = decoder.step(tokens, state)
        logp = log_probs(logits, banned)  # (N, V), N captions still in the batch
        if t == max_len:  # out of room: end here
            _only_end(logp, eos)
        step_lp, tokens = logp.max(dim=-1)
        live = ~finished
        out[ids, t] = torch.where(live, tokens, eos)  # a mask, not a count: no wait for the device
        logprob.index_add_(0, ids, torch.where(live, step_lp, torch.zeros_like(step_lp)))
        finished |= tokens == eos
        if t % check_every == check_every - 1:
            n = int(finished.sum())  # the one question to the device
            if n == finished.shape[0]:
                break
            if n and drop_finished:
                stay = (~finished).nonzero().squeeze(1)
                state, tokens = decoder.keep_images(state, stay, 1), tokens[stay]
                ids, finished = ids[stay], finished[stay]
    return Hypotheses(out[:, None], logprob[:, None], logprob[:, None])


@torch.no_grad()
def beam_search(decoder, feats: torch.Tensor, bos: int, eos: int, max_len: int, beam_size: int = 3,
                length_norm: float = 0.0, block_trigrams: bool = False,
                banned: Sequence[int] = (), check_every: int = 1, drop_finished: bool = True,
                constraints: torch.Tensor | None = None, n_constraints: int = 0) -> Hypotheses:
    """Batched beam search over B images x K beams.

    Each step scores all K*V continuations per image and takes the best 2K. Candidates ending in
    <end> among the first K join that image's finished pool (ranked by logprob / length**alpha,
    alpha = `length_norm`, length counting <end>); the best K others continue. An image stops
    taking finished hypotheses once it holds K (so `beam_size=1` is exactly greedy). After
    `max_len` words every live beam is ended, so a search that never emits <end> still returns
    captions. `block_trigrams` forbids repeating any word trigram within a caption.

    `constraints` (B, V) of bit masks, with `n_constraints` = C > 0: words each caption must
    contain, C disjunctive sets per image (bit c of word w for image b set when w satisfies its
    c-th set: "cat" or "cats"). Constrained beam search (Anderson et al. 2017): each image keeps
    K beams for each of the S = 2**C subsets of sets satisfied so far, B*S*K rows, and a word
    moves a beam to the subset with that word's sets added. Each subset's beams are the best K of
    all continuations that lead to it. The captions come from the subset of all C (the best that
    says them all), or, when no caption there ended, the fullest one that has one. C = 0 is the
    plain search above.

    An image that holds K finished captions leaves the batch (`decoder.keep_images`): its results
    are stored and the steps after cost only the images still searched (`drop_finished=False`
    keeps it to the end, for comparison). In a batch of 32 Flickr8k photos the last
    image needs about 16 steps and the average one 11, so a third of the decoder's work went to
    images already done. (With constraints: K finished captions that say every word.)

    With `check_every` > 1 (InferencePlan.check_every: on a GPU) the search asks the device
    nothing at most steps: finished candidates join the pools whether or not there are any, and
    which images are done is asked every `check_every` steps. The captions are the same.
    """
    B, K, dev = feats.shape[0], beam_size, feats.device
    S = 1 << n_constraints  # subsets of the constraints satisfied so far; S-1: all of them
    SK, L = S * K, max_len + 1
    banned = _on(banned, dev)
    state = decoder.select(decoder.start(feats), torch.arange(B, device=dev).repeat_interleave(SK))
    tokens = torch.full((B * SK,), bos, dtype=torch.long, device=dev)
    seqs = torch.empty((B * SK, 0), dtype=torch.long, device=dev)  # (B*S*K, t) words so far
    scores = torch.full((B, S, K), NEG_INF, device=dev)
    scores[:, 0, 0] = 0.0  # one live beam, satisfying nothing yet, so the K beams do not repeat each other
    fin_tokens = torch.full((B, S, K, L), eos, dtype=torch.long, device=dev)
    fin_logp = torch.full((B, S, K), NEG_INF, device=dev)
    fin_score = torch.full((B, S, K), NEG_INF, device=dev)
    done = torch.zeros(B, S, dtype=torch.bool, device=dev)  # the subset holds K finished captions
    first_k = torch.arange(2 * K, device=dev) < K
    first_row = torch.arange(B, device=dev)[:, None, None] * SK  # (B, 1, 1) each image's first row, b*S*K
    if S > 1:  # the subset each of the S*K beams is in, and each subset's index
        beam_subset = torch.arange(S, device=dev).repeat_interleave(K)[None, :, None]  # (1, SK, 1)
        subsets = torch.arange(S, device=dev)[None, :, None, None]  # (1, S, 1, 1)
    ids = torch.arange(B, device=dev)  # each image still searched: its place in the results
    results = Hypotheses(torch.full((B, K, L), eos, dtype=torch.long, device=dev),
                         torch.full((B, K), NEG_INF, device=dev), torch.full((B, K), NEG_INF, device=dev))

    for t in range(L):
        logits, state = decoder.step(tokens, state)
        logp = log_probs(logits, banned)  # (N*S*K, V), N images still searched
        N, V = scores.shape[0], logp.shape[1]
        if block_trigrams and t >= 3:
            _block_repeated_trigrams(logp, seqs)
        if t == max_len:
            _only_end(logp, eos)
        cand = scores.view(N, SK, 1) + logp.view(N, SK, V)  # (N, S*K, V)
        if S > 1:  # each continuation counts for the subset it leads to, and only there
            leads_to = beam_subset | constraints[ids][:, None, :]  # (N, S*K, V)
            cand = torch.where(leads_to[:, None] == subsets, cand[:, None], NEG_INF)  # (N, S, S*K, V)
        top_s, top_i = cand.reshape(N, S, SK * V).topk(min(2 * K, SK * V), dim=2)  # (N, S, 2K)
        beam_i, tok_i = top_i // V, top_i % V
        parent = first_row[:N] + beam_i  # (N, S, 2K) row in the N*S*K layout
        is_eos = tok_i == eos

        new = is_eos & first_k[: top_s.shape[2]] & ~done[..., None] & torch.isfinite(top_s)
        if check_every > 1 or new.any():  # asking new.any() waits for the device
            norm = top_s / float(t + 1) ** length_norm if length_norm else top_s
            cand_tokens = torch.cat([seqs[parent], tok_i[..., None]], dim=-1)  # (N, S, 2K, t+1)
            cand_tokens = F.pad(cand_tokens, (0, L - t - 1), value=eos)
            pool_score = torch.cat([fin_score, torch.where(new, norm, NEG_INF)], dim=2)
            pool_logp = torch.cat([fin_logp, torch.where(new, top_s, NEG_INF)], dim=2)
            pool_tokens = torch.cat([fin_tokens, cand_tokens], dim=2)
            fin_score, keep = pool_score.topk(K, dim=2)
            fin_logp = pool_logp.gather(2, keep)
            fin_tokens = pool_tokens.gather(2, keep[..., None].expand(-1, -1, -1, L))
            done |= torch.isfinite(fin_score).all(dim=2)
        if t == max_len:
            break
        leaving = 0  # images with K finished captions leave the batch: the steps after cost only the others
        if t % check_every == check_every - 1:
            leaving = int(done[:, -1].sum())  # the one question to the device
            if leaving == N:
                break

        alive = torch.where(is_eos, NEG_INF, top_s)
        scores, order = alive.topk(K, dim=2)  # (N, S, K)
        chosen = parent.gather(2, order).view(-1)
        tokens = tok_i.gather(2, order).view(-1)
        seqs = torch.cat([seqs[chosen], tokens[:, None]], dim=1)
        state = decoder.select(state, chosen)
        if leaving and drop_finished:
            _store(results, ids, fin_tokens, fin_logp, fin_score)  # the ones staying are stored again later
            stay = (~done[:, -1]).nonzero().squeeze(1)
            rows = image_rows(stay, SK)
            state, tokens, seqs = decoder.keep_images(state, stay, SK), tokens[rows], seqs[rows]
            scores, fin_tokens, fin_logp, fin_score = scores[stay], fin_tokens[stay], fin_logp[stay], fin_score[stay]
            ids, done = ids[stay], done[stay]
    _store(results, ids, fin_tokens, fin_logp, fin_score)
    return results


def _store(results: Hypotheses, ids: torch.Tensor, tokens: torch.Tensor, logprob: torch.Tensor,
           score: torch.Tensor) -> None:
    """Write the finished pools of the images `ids` into the search's results: (N, S, K, ...) pools,
    of each image the pool of the fullest subset of constraints that holds a finished caption
    (all of them, S-1, unless none ended there)."""
    S = score.shape[1]
    fullness = torch.tensor([bin(s).count("1") for s in range(S)], device=score.device)
    ended = torch.isfinite(score[:, :, 0])  # (N, S)
    best = torch.where(ended, fullness, -1).argmax(dim=1)  # (N,) the subset each image's captions come from
    n = torch.arange(len(ids), device=score.device)
    results.tokens.index_copy_(0, ids, tokens[n, best])
    results.logprob.index_copy_(0, ids, logprob[n, best])
    results.score.index_copy_(0, ids, score[n, best])


def _block_repeated_trigrams(logp: torch.Tensor, seqs: torch.Tensor) -> None:
    """Forbid word w after (a, b) when the trigram (a, b, w) already occurs in the row. (A scatter
    of the matches rather than indexing by them: the device never has to say how many there are.)"""
    a, b = seqs[:, -2:-1], seqs[:, -1:]
    hit = (seqs[:, :-2] == a) & (seqs[:, 1:-1] == b)  # (N, t-2): trigram starting at j matches
    banned = torch.zeros_like(logp).scatter_reduce_(1, seqs[:, 2:], hit.to(logp.dtype), "amax")  # (N, V)
    logp.masked_fill_(banned > 0, NEG_INF)


def sample(decoder, feats: torch.Tensor, bos: int, eos: int, max_len: int, n: int = 5,
           banned: Sequence[int] = (), temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `n` captions per image from the model, keeping the graph (self-critical training).

    Returns tokens (B*n, L), the log-probability of each drawn token (B*n, L) and a mask (B*n, L)
    that is 1 up to and including each caption's <end>; rows b*n .. b*n+n-1 belong to image b.
    """
    B, dev = feats.shape[0], feats.device
    L = max_len + 1
    banned = _on(banned, dev)
    state = decoder.select(decoder.start(feats), torch.arange(B, device=dev).repeat_interleave(n))
    tokens = torch.full((B * n,), bos, dtype=torch.long, device=dev)
    out_tokens, out_logp, out_mask = [], [], []
    alive = torch.ones(B * n, dtype=torch.bool, device=dev)
    for t in range(L):
        logits, state = decoder.step(tokens, state)
        logp = log_probs(logits, banned, temperature)  # (B*n, V)
        if t == max_len:  # out of room: <end>, with its real log-probability (never sampled: exp() of a
            tokens = torch.full_like(tokens, eos)  # very unlikely <end> can underflow to 0)
        else:
            tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)  # (B*n,)
        out_tokens.append(torch.where(alive, tokens, torch.full_like(tokens, eos)))
        out_logp.append(logp.gather(1, tokens[:, None]).squeeze(1))
        out_mask.append(alive.float())
        alive = alive & (tokens != eos)
        if not alive.any():
            break
    return torch.stack(out_tokens, 1), torch.stack(out_logp, 1), torch.stack(out_mask, 1)
