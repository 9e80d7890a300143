"""The normalised form of a text, shared by the leak audit (`prepare`) and the built-in sets' cleaning (`builtin`).

Its own module so that neither of those imports the other for it.
"""

from __future__ import annotations

import re
import unicodedata


def normalise(text: str) -> str:
    """The form used to find duplicates: NFKC, lower case, collapsed white space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()
