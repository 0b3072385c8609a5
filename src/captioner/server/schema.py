"""The shapes of the REST API's answers, so that /openapi.json (and the /docs page built from it)
says exactly what each endpoint returns, errors included."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every error answer: one line saying what is wrong."""

    detail: str = Field(examples=["notes.txt: not a readable image (UnidentifiedImageError)"])


class Alternative(BaseModel):
    caption: str
    logprob: float = Field(description="summed log-probability of the words and <end>")
    score: float = Field(description="what the search ranks by: logprob / length**length_norm")
    match: float | None = Field(None, description="with a decoding that re-ranks by the search space: the cosine "
                                "of the caption and the photo there; the beams are then in the order of "
                                "score + space_rerank x match - rarity_penalty x rarity")
    rarity: float | None = Field(None, description="with a decoding that penalises rare words: how rare the "
                                 "caption's words are, the mean log of their rank in the vocabulary")


class Tag(BaseModel):
    word: str = Field(description="a word for what the encoder's ImageNet classifier recognises")
    score: float = Field(description="the probability of the classes it names, 0 to 1")


class Disagreement(BaseModel):
    caption_says: str = Field(description="an animal the caption names")
    encoder_sees: str = Field(description="what the encoder is confident of instead")
    score: float


class CaptionResult(BaseModel):
    """One uploaded file: its caption, or the error that kept it from being captioned."""

    filename: str
    caption: str | None = None
    logprob: float | None = None
    score: float | None = None
    alternatives: list[Alternative] | None = Field(None, description="the beams, best first")
    tags: list[Tag] | None = Field(None, description="what the encoder recognises, best first (score >= 0.1)")
    disagrees: Disagreement | None = Field(None, description="present when the caption names an animal the "
                                                             "encoder gives almost no chance to: out of its world")
    error: str | None = Field(None, description="why this file was not captioned (the others still were)")


class CaptionResponse(BaseModel):
    results: list[CaptionResult] = Field(description="one per uploaded file, in the order sent")
    seconds: float = Field(description="time spent on the request, reading the files included")


class Hit(BaseModel):
    id: int
    path: str
    caption: str
    score: float = Field(description="higher is better: BM25 relevance of the caption (keyword mode), the cosine of "
                                     "the words and the photo in the search space (embedding), the model's "
                                     "log-probability of the query per word (model; hybrid adds the other scores), "
                                     "or the cosine similarity of the photos (like)")
    relevance: float | None = Field(None, description="embedding and hybrid, with a model whose search space is "
                                    "calibrated: the share of right answers on its val set that scored lower, 0 to 1; "
                                    "below 0.05 the note says there is no good match")
    thumb: str = Field(description="URL of a JPEG thumbnail; add ?size=N (32-2048) for a larger one")


class SearchResponse(BaseModel):
    query: str = Field(description="the words searched for, or the example photo's name")
    mode: str = Field(description="how the photos were ranked: keyword, embedding, model, hybrid or like")
    total: int = Field(description="how many photos match the keywords, or were ranked by the model, in all (results "
                                   "holds at most `limit` of them)")
    note: str | None = Field(None, description="what the user should know: words the model does not know, photos "
                                               "left out, a fall back to keywords")
    results: list[Hit] = Field(description="best first")


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    model: str = Field(description="the model's folder, or 'shipped'")
    decoder: str = Field(examples=["attention"])
    library: str | None = Field(None, description="the photo library's database, when one is loaded")


def errors(*codes: int) -> dict:
    """The `responses=` of an endpoint: these error statuses, each documented with its meaning."""
    meaning = {
        404: "unknown photo, or no photo library loaded",
        413: "too large: more bytes, pixels or files than the server's limits",
        415: "not an image this server can read",
        422: "a parameter is missing or out of range",
        503: "busy: the model had no turn free within the queue timeout (see Retry-After)",
    }
    return {c: {"model": Error, "description": meaning[c]} for c in codes}
