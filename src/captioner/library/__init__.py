"""A photo library: the caption of every photo under some folders, in SQLite, searchable by words
and by meaning.

    store.py    the database: schema, opening it, writing a batch, the reads searches share
    index.py    index_folders(): caption the photos under folders, incrementally
    search.py   search() by words in four modes
    like.py     similar(): by example photo
"""

from captioner.library.index import IndexReport, index_folders
from captioner.library.like import similar
from captioner.library.search import (
    DEFAULT_MODE,
    MODES,
    Found,
    ModelView,
    fts_query,
    keyword_scores,
    rank,
    search,
)
from captioner.library.store import connect, indexed_by, photo_path, reading

__all__ = ["DEFAULT_MODE", "MODES", "Found", "IndexReport", "ModelView", "connect", "fts_query", "index_folders",
           "indexed_by", "keyword_scores", "photo_path", "rank", "reading", "search", "similar"]
