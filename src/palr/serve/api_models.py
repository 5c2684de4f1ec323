"""Request and response schemas of the HTTP service (pydantic), apart from the model code.

Field limits come from :mod:`palr.rank.pipeline` (the command line checks the same ones); ``k``'s upper bound is the
run's candidate count, checked by :meth:`palr.rank.pipeline.PALR.recommend` (422 too).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from palr.rank.pipeline import MAX_HISTORY, MAX_ITEM_ID, MAX_USER_ID

ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID)]
# the cost of a request is bounded before any work: fuzzy title matching is the dearest step (every title against
# the whole catalogue), so titles are fewer and shorter over HTTP than a local history may be
MAX_TITLES = 100  # history_titles per request
MAX_TITLE_CHARS = 200  # characters of one title
MAX_TITLES_TOTAL_CHARS = 12_000  # characters of all titles of a request
MAX_QUERY_WORDS = 10  # different words of GET /items?q=


class RecommendRequest(BaseModel):
    """A known user (their whole history is used), a history of item ids, or of titles, for a new user: one."""

    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(None, min_length=1, max_length=MAX_USER_ID, description="A known user id.",
                             examples=["1"])
    history: list[ItemId] | None = Field(None, max_length=MAX_HISTORY,
                                         description="Item ids, oldest first (a new user).", examples=[["50", "181"]])
    history_titles: list[Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]] | None = Field(
        None, max_length=MAX_TITLES, description=f"Titles, oldest first, matched fuzzily (the matches are returned); "
        f"at most {MAX_TITLES}, {MAX_TITLES_TOTAL_CHARS:,} characters in all.",
        examples=[["Star Wars (1977)", "Fargo (1996)"]])
    k: int = Field(10, ge=1, description="How many items: 1 to the run's candidate count (GET /health: max_k).")
    explain: bool = Field(False, description="One grounded sentence per item.")

    @model_validator(mode="after")
    def _one_of(self) -> RecommendRequest:
        if self.history_titles is not None and sum(map(len, self.history_titles)) > MAX_TITLES_TOTAL_CHARS:
            raise ValueError(f"history_titles hold at most {MAX_TITLES_TOTAL_CHARS:,} characters in all")
        if sum(x is not None for x in (self.user, self.history, self.history_titles)) != 1:
            given = sum(x is not None for x in (self.user, self.history, self.history_titles))
            raise ValueError("give 'user' or 'history' (or 'history_titles'), not both" if given else
                             "give 'user' or 'history' (or 'history_titles')")
        return self


class RecommendedItem(BaseModel):
    item: str = Field(description="The item's original id.")
    title: str
    score: float | None = Field(description="The fused ranking score (higher is better); none for popularity "
                                "fallback items.")
    retriever_rank: int | None = Field(description="The item's rank in the retriever's candidate list (1 = first).")
    popularity: int | None = Field(None, description="Fallback items (no usable history): interactions in training.")
    explanation: str | None = Field(None, description="With explain=true: why this item.")
    because: list[dict[str, Any]] | None = Field(None, description="The explanation's evidence: history items and "
                                                 "the attributes each shares with this item.")
    explanation_source: str | None = Field(None, description="template, llm, or why an LLM sentence was rejected.")


class RecommendResponse(BaseModel):
    user: str | None
    profile: str = Field(description="The user's profile (PALR step 1).")
    items: list[RecommendedItem]
    notes: list[str] = Field(description="Anything the caller should know: ignored ids, fallbacks.")
    llm: dict[str, Any] = Field(default_factory=dict, description="What ranked: 'ranked_by' (what ordered these "
                                "items, e.g. 'trees + LLM', 'sasrec order (LLM failed)', 'popularity'), 'consulted' "
                                "(the same as a list), 'ranker' (the run's ranker, saying when its LLM goes unused); "
                                "the LLM, its failures and fallbacks so far.")
    matches: list[dict[str, Any]] = Field(default_factory=list, description="history_titles: what each matched.")


class CatalogItem(BaseModel):
    item: str
    title: str
    tags: list[str] = Field(description="Genres or categories.")
    popularity: int = Field(description="Interactions in the training split.")


class ItemsResponse(BaseModel):
    query: str
    total: int = Field(description="Matching items (the response holds at most 'limit').")
    items: list[CatalogItem]


class UserResponse(BaseModel):
    user: str
    profile: str
    history: list[CatalogItem] = Field(description="Everything the user did, oldest first.")


class UsersResponse(BaseModel):
    total: int
    users: list[str] = Field(description="The first user ids (for a picker).")


class Slots(BaseModel):
    """The compute slots: how saturated the service is."""

    in_use: int = Field(description="Requests computing now.")
    max_concurrent: int = Field(description="Requests computed at once at most.")
    waiting: int = Field(description="Admitted requests waiting for a slot.")
    max_queue: int = Field(description="Requests that may wait; a further one gets 503.")
    rejected: int = Field(description="Requests answered 503 (saturated) since the start.")


class Health(BaseModel):
    status: str = Field(description="'ok', or 'saturated' while every slot and queue place is taken (503s).")
    run: str = Field(description="The run's name (its folder's name, not its path).")
    dataset: str
    users: int
    items: int
    max_k: int = Field(description="The largest k of POST /recommend: the candidate count.")
    auth: bool = Field(description="Whether the API needs a bearer token.")
    slots: Slots


__all__ = ["CatalogItem", "Health", "ItemsResponse", "RecommendRequest", "RecommendResponse", "RecommendedItem",
           "Slots", "UserResponse", "UsersResponse"]
