"""How the packaged encyclopedia text was made (run once; its output is committed).

The evaluation suite and the default calibration need modern expository
prose, redistributable, and with no Hub access. gensim's wheel on PyPI ships
a shortened dump of English Wikipedia (about a hundred articles, revisions of
April 2016) as test data. This script reads that dump from the wheel, turns
each article's wiki markup into plain text with mwparserfromhell, drops the
reference sections, and writes two disjoint sets of articles as gzipped JSON
lines ({"title", "oldid", "text"}), keeping each article's revision id for
attribution (Wikipedia text is CC BY-SA 3.0; see shortgpt_hf/data/NOTICE.md).

    pip download --no-deps gensim==4.4.0 -d /tmp/gensim
    pip install mwparserfromhell==0.7.2
    python benchmarks/make_encyclopedia_text.py /tmp/gensim/gensim-4.4.0-*.whl
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import re
import sys
import zipfile
from pathlib import Path

import mwparserfromhell

DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT = Path(__file__).resolve().parents[1] / "shortgpt_hf" / "data"
HELDOUT = ("Albedo", "Aardvark", "Atlantic Ocean", "International Atomic Time", "Andorra")
CALIBRATION = (
    "Alchemy", "Agriculture", "Algae", "Apollo 11", "Asphalt", "Aristotle", "Abacus", "Acid",
    "Aldous Huxley", "Amateur astronomy", "Alphabet",
)  # fmt: skip
END_SECTIONS = re.compile(
    r"^=+\s*(See also|References|Notes|Footnotes|External links|Further reading|Bibliography|Sources)\s*=+\s*$", re.M
)  # noqa: E501


def plain_text(wikitext: str) -> str:
    """The article's prose: markup stripped, reference sections and leftover file/category lines dropped."""
    end = END_SECTIONS.search(wikitext)
    text = mwparserfromhell.parse(wikitext[: end.start()] if end else wikitext).strip_code()
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not re.match(r"^(thumb|left|right|upright|\d+px)\b|^Category:", line)]
    return "\n".join(kept)


def main(wheel: str) -> None:
    dump = bz2.decompress(zipfile.ZipFile(wheel).read(DUMP)).decode("utf-8")
    articles = {}
    for page in re.findall(r"<page>(.*?)</page>", dump, re.S):
        title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
        body = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        if body and "<redirect" not in page:
            oldid = re.search(r"<revision>\s*<id>(\d+)</id>", page).group(1)
            articles[title] = {"title": title, "oldid": int(oldid), "text": plain_text(html.unescape(body.group(1)))}
    for name, titles in (("heldout", HELDOUT), ("calibration", CALIBRATION)):
        lines = "".join(json.dumps(articles[t], ensure_ascii=False) + "\n" for t in titles)
        (OUT / f"encyclopedia_{name}.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8"), mtime=0))


if __name__ == "__main__":
    main(sys.argv[1])
