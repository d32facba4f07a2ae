"""Build `calibration_data/` from the shared text corpus: small cuts, fixed order, with a README.

The output is deterministic: the same sources give byte-identical files (gzip headers carry no
time stamp or file name), so re-running the script after a change shows a clean diff.

    python scripts/make_calibration_data.py                         # ../shared/data -> calibration_data/
    python scripts/make_calibration_data.py --source DIR --out DIR

Which file is for calibration and which for evaluation is written into the README this script
produces; `quantkit.data` enforces the split (calibration never reads an evaluation file).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "calibration_data"

WIKITEXT_TEST_MD5 = "7c0137fc034ddbc56a296bce31b4f7fb"
CALIBRATION_PART = "wiki_part00.jsonl.gz"
CALIBRATION_ARTICLES = 300
HELDOUT_PART = "wiki_part03.jsonl.gz"
HELDOUT_ARTICLES = 150


def md5_of_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_gzip(path: Path, data: bytes) -> None:
    """gzip with no file name and mtime 0 in the header, so the bytes depend only on `data`."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def read_article_lines(path: Path) -> list[bytes]:
    """The JSON lines of a Wikipedia part, unchanged, in file order (blank lines skipped)."""
    with gzip.open(path, "rb") as f:
        lines = [line if line.endswith(b"\n") else line + b"\n" for line in f if line.strip()]
    for line in lines:
        record = json.loads(line)
        if not isinstance(record.get("title"), str) or not isinstance(record.get("text"), str):
            raise SystemExit(f"{path}: a line lacks string 'title' and 'text' fields")
    return lines


def copy_wikitext_test(source: Path, out: Path) -> None:
    data = (source / "wikitext-2" / "wiki.test.raw").read_bytes()
    if md5_of_bytes(data) != WIKITEXT_TEST_MD5:
        raise SystemExit(f"wiki.test.raw md5 is {md5_of_bytes(data)}, expected {WIKITEXT_TEST_MD5}")
    target = out / "wikitext2" / "wiki.test.raw"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "wikitext-2" / "wiki.test.raw", target)
    if md5_of_bytes(target.read_bytes()) != WIKITEXT_TEST_MD5:
        raise SystemExit(f"copy of wiki.test.raw at {target} does not match its md5")


def write_outputs(source: Path, out: Path) -> dict[str, bytes]:
    """Write every data file; return each one's uncompressed content by relative path."""
    copy_wikitext_test(source, out)
    contents = {"wikitext2/wiki.test.raw": (out / "wikitext2" / "wiki.test.raw").read_bytes()}

    valid = (source / "wikitext-2" / "wiki.valid.tokens").read_bytes()
    contents["wikitext2/wiki.valid.tokens.gz"] = valid

    articles = read_article_lines(source / "wikipedia-en" / CALIBRATION_PART)
    contents["wikipedia/calibration.jsonl.gz"] = b"".join(articles[:CALIBRATION_ARTICLES])

    articles = read_article_lines(source / "wikipedia-en" / HELDOUT_PART)
    contents["wikipedia/heldout.jsonl.gz"] = b"".join(articles[-HELDOUT_ARTICLES:])

    for relative, data in contents.items():
        if relative.endswith(".gz"):
            write_gzip(out / relative, data)
    return contents


def readme_text(out: Path, contents: dict[str, bytes]) -> str:
    def md5_row(relative: str) -> str:
        file_md5 = md5_of_bytes((out / relative).read_bytes())
        size = (out / relative).stat().st_size
        content_md5 = md5_of_bytes(contents[relative])
        return f"| `{relative}` | {size:,} | `{file_md5}` | `{content_md5}` |"

    rows = "\n".join(md5_row(relative) for relative in sorted(contents))
    return README_TEMPLATE.format(
        md5_rows=rows,
        calibration_articles=CALIBRATION_ARTICLES,
        calibration_part=CALIBRATION_PART,
        heldout_articles=HELDOUT_ARTICLES,
        heldout_part=HELDOUT_PART,
        wikitext_md5=WIKITEXT_TEST_MD5,
    )


README_TEMPLATE = """\
# calibration_data

The text quantkit calibrates and evaluates on, offline. Built by
`python scripts/make_calibration_data.py` from the project's shared copy of the public corpora
(deterministic: re-running it gives identical files). Read through `quantkit.data`.

| file | source | how it was cut | use |
| --- | --- | --- | --- |
| `wikitext2/wiki.test.raw` | WikiText-2 raw, test split | exact copy (md5 `{wikitext_md5}`) | **evaluation only** (`evaluation_text("wikitext2")`) |
| `wikitext2/wiki.valid.tokens.gz` | WikiText-2 tokenized, valid split | the whole split, gzip | **calibration** (`"wikitext2"`) |
| `wikipedia/calibration.jsonl.gz` | English Wikipedia articles (2019), `{calibration_part}` | the first {calibration_articles} articles, in file order | **calibration** (`"wikipedia"`, the default) |
| `wikipedia/heldout.jsonl.gz` | English Wikipedia articles (2019), `{heldout_part}` | the last {heldout_articles} articles, in file order | **evaluation only** (`"wikipedia-heldout"`) |

The Wikipedia files are gzip-compressed JSON lines, one `{{"title", "text"}}` object per article,
copied byte for byte from the source lines. The bundled reference models were trained on the
Wikipedia articles minus exactly the held-out ones (`quantkit.data.heldout_titles()`), and never
on WikiText-2, so both evaluation files are text those models have not seen. Calibration never
reads an evaluation file: `load_texts("wikipedia-heldout", purpose="calibration")` is an error.

## How the files are read

- `wiki.test.raw` holds one row of the Hugging Face `wikitext-2-raw-v1` test split per line; a
  row that was empty is written as a single space, and every other row lost only its final
  newline. `evaluation_text("wikitext2")` rebuilds the rows (`""` for a line that is one space,
  the line plus `"\\n"` otherwise) and returns `"\\n\\n".join(rows)`, the GPTQ-style evaluation string.
- `wiki.valid.tokens` is split into its 60 articles at the top-level headings (` = Title = `
  between blank lines); each article's lines are stripped, WikiText's ` @-@ `, ` @,@ `, ` @.@ `
  are turned back into `-`, `,`, `.`, and the lines are joined by blank lines.

## Where quantkit finds this folder

1. `$QUANTKIT_DATA_DIR`, when set (point it at a copy of this folder; needed when quantkit is
   installed from a wheel rather than from a source checkout);
2. otherwise `calibration_data/` at the root of the source checkout the package was imported
   from (an editable install or running from the repository).

## Checksums

md5 of each file as stored, and of its uncompressed content.

| file | bytes | md5 (file) | md5 (content) |
| --- | --- | --- | --- |
{md5_rows}

## Licence and attribution

All text here is licensed under the Creative Commons Attribution-ShareAlike 3.0 licence
(CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/).

- WikiText-2: Stephen Merity, Caiming Xiong, James Bradbury and Richard Socher, "Pointer Sentinel
  Mixture Models", 2016 (arXiv:1609.07843), built from Wikipedia articles. The raw test split is
  as published in the Hugging Face `wikitext-2-raw-v1` rows; the tokenized valid split as in
  pytorch/examples (word_language_model/data/wikitext-2).
- Wikipedia articles: text by Wikipedia contributors (https://en.wikipedia.org), taken from the
  pages of chinapedia/wikipedia.abstract.en with table lines removed. Each article's title names
  its Wikipedia page, whose history lists its authors.

The files are redistributed unchanged apart from the cuts described above.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="shared data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="calibration_data folder")
    args = parser.parse_args()
    contents = write_outputs(args.source, args.out)
    (args.out / "README.md").write_text(readme_text(args.out, contents), encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
