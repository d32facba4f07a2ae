"""The WikiText-2 file formats: raw test rows and articles of the tokenized valid split."""

from __future__ import annotations

import re

# WikiText splits hyphens and number separators into tokens: "1 @,@ 000", "well @-@ known".
_DETOKENIZE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def rows_from_raw(raw: str) -> list[str]:
    """The Hugging Face dataset rows that a `wiki.test.raw`-style file holds, one per line.

    The file has each row on its own line with the row's final newline as the line break, and an
    empty row written as a single space; so a line of one space is the row "" and any other line
    is the row ``line + "\\n"``.
    """
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a line break
    return ["" if line.strip() == "" else line + "\n" for line in lines]


def detokenize(text: str) -> str:
    """Undo WikiText's ``@-@``, ``@,@`` and ``@.@`` splits."""
    for split_form, joined in _DETOKENIZE:
        text = text.replace(split_form, joined)
    return text


def articles_from_tokens(tokens_text: str) -> list[str]:
    """Split a `wiki.*.tokens` file into articles, detokenized, paragraphs joined by blank lines.

    An article starts at a top-level heading ``" = Title = "`` that stands between blank lines
    (section headings are ``" = = Section = = "``).
    """
    lines = tokens_text.split("\n")
    articles: list[list[str]] = []
    for i, line in enumerate(lines):
        if _is_article_heading(lines, i):
            articles.append([])
        if line.strip() and articles:
            articles[-1].append(detokenize(line.strip()))
    return ["\n\n".join(paragraphs) for paragraphs in articles]


def _is_article_heading(lines: list[str], i: int) -> bool:
    blank_before = i == 0 or not lines[i - 1].strip()
    blank_after = i + 1 >= len(lines) or not lines[i + 1].strip()
    return bool(_ARTICLE_HEADING.match(lines[i])) and blank_before and blank_after
