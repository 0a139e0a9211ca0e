"""Retrieval for grounded answers, measured on this box, on a corpus the bench writes
itself (seeded): Markdown procedures of a fictitious plant and protocols of a fictitious
hospital, about 3 pages (a page: 2,500 characters) each, a twentieth of them as PDF and
a twentieth as HTML, each document holding planted facts (made-up codes, numbers, names).

1. Ingest: `appliance docs add DIR --collection bench --json` (extraction, 800-character
   passages, MiniLM embeddings, sealing): pages/s and passages/s of the CLI call's wall
   time, against MiniLM alone embedding a sample of the same passages in this process.
2. Retrieval latency at about 10,000 passages: the index built in this process from the
   sealed store (its build time), then for each question MiniLM's embedding and
   Index.search (top 5): p50/p95 of the search alone and of embedding + search, with the
   search's two halves (BM25 in SQLite FTS5, the cosine scan) timed apart; and the same
   questions through the server's POST /v1/retrieve, end to end.
3. Recall@5 (recall@1, MRR) on questions that paraphrase ~200 planted facts, each
   labelled with the passage(s) holding the fact's sentence, for the fused ranking and
   for its BM25 and vector lists alone (read from each hit's text_rank / vector_rank).
4. Time to first token of smollm2-135m-instruct through the server (openai SDK,
   streamed, 8 tokens, temperature 0) for 20 questions: ungrounded, grounded on the
   collection (top 3), and the same grounded question again (its prompt in the KV cache).

Targets: 10,000 +- 10 % passages at the default --docs; search p50 <= 15 ms;
recall@5 >= 0.9.

    .venv/bin/python bench/retrieve.py [--docs 670] [--questions 200] [--ttft 20] \
        [--baseline-docs 30] [--seed 23] [--out FILE]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from openai import OpenAI  # noqa: E402
from pdfs import write_pdf  # noqa: E402
from specialist import BASE, garden_state  # noqa: E402

from appliance.audit.crypto import load_master_key  # noqa: E402
from appliance.config import load_settings  # noqa: E402
from appliance.docs.calibrate import WEIGHTS, best_weight  # noqa: E402
from appliance.docs.index import CANDIDATES, Index, fts_query  # noqa: E402
from appliance.docs.store import DocStore, Stored  # noqa: E402
from appliance.engines.embed import EmbeddingEngine  # noqa: E402
from appliance.engines.kernels import cpu_model  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from helpers import run_cli, start_server  # noqa: E402

COLLECTION = "bench"
EMBEDDING = "minilm-l6-v2"
PAGE_CHARS = 2500
PAGES = 3
FACTS_PER_DOC = 5
TARGET_PASSAGES = 10_000
SEARCH_P50_TARGET_MS = 15.0
RECALL_TARGET = 0.9
CALIBRATION_QUESTIONS = 100  # labelled questions the fusion weight is chosen on
TOP_K = 5

# -- the corpus ---------------------------------------------------------------------

SITES = ["Harrowgate", "Lindenfeld", "Marrow Bay", "Oakhollow", "Kestrel Point", "Dunmere"]
MACHINES = [
    "filler", "capper", "palletiser", "chiller", "extruder", "mixer", "labeller",
    "granulator", "dryer", "press", "conveyor", "compressor",
]  # fmt: skip
PLANT_HEADINGS = [
    "Scope", "Safety and isolation", "Tools and materials", "Inspection", "Adjustment",
    "Cleaning", "Restart", "Faults and escalation", "Records", "Training",
]  # fmt: skip
WARDS = [
    "cardiology", "oncology", "maternity", "paediatric", "orthopaedic", "renal", "stroke",
    "respiratory", "surgical", "geriatric",
]  # fmt: skip
TOPICS = [
    "central line care", "sepsis screening", "blood transfusion", "falls prevention",
    "pressure ulcer prevention", "medication rounds", "theatre preparation",
    "patient transfer", "hand hygiene", "insulin administration",
]  # fmt: skip
HOSPITAL_HEADINGS = [
    "Purpose", "Who this applies to", "Before you start", "Steps", "Monitoring",
    "Escalation", "Documentation", "Audit", "Training", "References",
]  # fmt: skip
SUBHEADINGS = ["Exceptions", "Common mistakes", "Night shift", "Weekends", "Handover"]
FILLER = {
    "plant": (
        [
            "The shift technician", "The area supervisor", "An operator on the night shift",
            "The reliability engineer", "A contractor", "The team leader",
            "The electrician on call", "The process engineer",
        ],
        [
            "checks", "records", "inspects", "cleans", "tightens", "calibrates",
            "lubricates", "replaces", "signs off", "photographs", "tests", "adjusts",
        ],
        [
            "the guard interlocks", "the drive chain", "the pressure gauge readings",
            "the lockout tags", "the filter housings", "the seal faces",
            "the cooling water flow", "the alarm history", "the belt tension",
            "the spare parts list", "the emergency stop buttons", "the hydraulic hoses",
            "the motor terminals", "the product sensors",
        ],
        [
            "before the line is restarted", "at the start of every shift",
            "after any unplanned stop", "and writes the result in the logbook",
            "once the area has been isolated", "within {n} minutes of an alarm",
            "every {n} operating hours", "using the checklist in appendix {L}",
            "with a second person present", "and reports any damage to the supervisor",
            "while the machine is locked out", "",
        ],
    ),
    "hospital": (
        [
            "The nurse in charge", "The ward pharmacist", "A registered nurse",
            "The consultant on call", "The healthcare assistant",
            "The infection control team", "The junior doctor", "The ward manager",
        ],
        [
            "reviews", "documents", "checks", "escalates", "confirms", "reassesses",
            "discusses", "updates", "records", "explains",
        ],
        [
            "the patient's observations", "the fluid balance chart", "the allergy status",
            "the consent form", "the cannula site", "the early warning score",
            "the medication chart", "the discharge plan", "the wristband details",
            "the pain score", "the care plan", "the blood results",
        ],
        [
            "before the first dose is given", "at every handover",
            "within {n} hours of admission", "with a second checker",
            "if the score rises above {n}", "and tells the family what was agreed",
            "in the electronic record", "as set out in section {n}",
            "before the patient leaves the ward", "at least every {n} hours", "",
        ],
    ),
}  # fmt: skip
ASIDES = [
    "If in doubt, stop and ask.",
    "This step must not be skipped, even when the schedule is tight.",
    "Deviations are reported through the incident system on the same day.",
    "New starters complete this under supervision until they are signed off.",
    "The current version of this document is the one on the intranet.",
    "Printed copies are for reference only.",
]
FIRST = ["Amara", "Bruno", "Celia", "Dmitri", "Edda", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Petrov", "Tanaka", "Varga", "Whitlow", "Ziegler"]
SYLLABLES = ["vel", "bro", "tam", "ora", "quil", "dex", "pra", "lon", "cor", "fen", "ri", "sa"]
ENDINGS = ["zine", "mide", "azol", "ilex", "opram", "ectin", "uvir", "olone"]


@dataclass
class Fact:
    sentence: str  # planted verbatim in the document
    question: str  # a paraphrase that names the same thing
    doc: int
    template: str


@dataclass
class Doc:
    index: int
    kind: str  # markdown | html | pdf
    domain: str
    title: str
    # (level, heading, paragraphs), each paragraph a list of sentences
    sections: list[tuple[int, str, list[list[str]]]] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)


class Names:
    """Codes, people and drugs, each new one unlike any before it (seeded)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def _new(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.seen:
                self.seen.add(name)
                return name
        raise RuntimeError("out of names")

    def code(self) -> str:
        letters = "ABCDEFGHJKLMNPRSTVWXZ"
        r = self.rng
        return self._new(lambda: f"{r.choice(letters)}{r.choice(letters)}-{r.randint(100, 999)}")

    def person(self) -> str:
        r = self.rng
        return f"{r.choice(FIRST)} {r.choice(LAST)}"

    def drug(self) -> str:
        r = self.rng
        return self._new(
            lambda: (r.choice(SYLLABLES) + r.choice(SYLLABLES) + r.choice(ENDINGS)).capitalize()
        )


PLANT_FACTS = [
    "valve torque", "compressor trip", "pump seals", "restart", "tank fill", "fan grease",
    "boiler blowdown",
]  # fmt: skip
HOSPITAL_FACTS = [
    "fasting", "infusion rate", "isolation room", "sedation checklist", "autoclave",
    "blood fridge", "crash trolley",
]  # fmt: skip


def plant_fact(r: random.Random, names: Names, machine: str, choice: int) -> tuple[str, str]:
    c = names.code()
    if choice == 0:
        line, nm = r.randint(1, 9), r.randint(12, 240)
        return (
            f"The {c} valve on line {line} is torqued to {nm} Nm.",
            f"What torque does the {c} valve on line {line} need?",
        )
    if choice == 1:
        bar = round(r.uniform(0.8, 4.5), 1)
        return (
            f"The {c} compressor trips when its oil pressure drops below {bar} bar.",
            f"At what oil pressure does the {c} compressor shut itself down?",
        )
    if choice == 2:
        cabinet, room = r.randint(1, 40), r.randint(100, 399)
        return (
            f"Spare seals for pump {c} are kept in cabinet {cabinet} of store room {room}.",
            f"Where can I find replacement seals for pump {c}?",
        )
    if choice == 3:
        return (
            f"Only {names.person()} may restart the {machine} {c} after an emergency stop.",
            f"Who is authorised to start the {machine} {c} again once it has been e-stopped?",
        )
    if choice == 4:
        pct, litres = r.randint(60, 95), r.choice([500, 800, 1200, 2000, 5000, 12000])
        return (
            f"Tank {c} is never filled above {pct} percent of its {litres} litre capacity.",
            f"What is the highest level tank {c} may be filled to?",
        )
    if choice == 5:
        hours, grease = r.randint(200, 4000), r.choice(["lithium grease", "EP2 grease"])
        return (
            f"The bearings of fan {c} are greased every {hours} running hours with {grease}.",
            f"How often does fan {c} need lubricant on its bearings?",
        )
    clock, shift = (
        f"{r.randint(5, 22):02d}:{r.choice(['00', '15', '30', '45'])}",
        r.choice(["early", "late", "night"]),
    )
    return (
        f"Boiler {c} is blown down at {clock} each day by the {shift} shift.",
        f"At what time is the daily blowdown of boiler {c} carried out?",
    )


def hospital_fact(r: random.Random, names: Names, ward: str, choice: int) -> tuple[str, str]:
    c = names.code()
    if choice == 0:
        hours = r.randint(2, 12)
        return (
            f"Patients on protocol {c} fast for {hours} hours before the procedure.",
            f"How long must a patient under protocol {c} go without food beforehand?",
        )
    if choice == 1:
        drug, rate = names.drug(), r.randint(5, 250)
        return (
            f"The maximum infusion rate of {drug} on the {ward} ward is {rate} ml per hour.",
            f"How fast may {drug} be run at most on the {ward} ward?",
        )
    if choice == 2:
        pa = r.randint(5, 30)
        return (
            f"Isolation room {c} is held at a negative pressure of {pa} pascals.",
            f"What pressure difference is maintained in isolation room {c}?",
        )
    if choice == 3:
        return (
            f"Dr {names.person()} signs off every change to sedation checklist {c}.",
            f"Who approves amendments to sedation checklist {c}?",
        )
    if choice == 4:
        temp, minutes = r.choice([121, 126, 134]), r.randint(3, 20)
        return (
            f"Autoclave {c} must hold {temp} degrees Celsius for {minutes} minutes per cycle.",
            f"What temperature and duration does a cycle of autoclave {c} require?",
        )
    if choice == 5:
        temp = r.choice([5, 6, 7])
        return (
            f"Blood fridge {c} alarms when it warms past {temp} degrees Celsius.",
            f"At what temperature does blood fridge {c} raise an alarm?",
        )
    days, tag = r.randint(1, 14), r.randint(10000, 99999)
    return (
        f"Crash trolley {c} is checked every {days} days and sealed with tag {tag}.",
        f"How frequently is crash trolley {c} inspected?",
    )


def filler_sentence(r: random.Random, domain: str) -> str:
    if r.random() < 0.08:
        return r.choice(ASIDES)
    subjects, verbs, objects, tails = FILLER[domain]
    tail = r.choice(tails).format(n=r.randint(2, 48), L=r.choice("ABCDEFG"))
    text = f"{r.choice(subjects)} {r.choice(verbs)} {r.choice(objects)}"
    return text + (f" {tail}." if tail else ".")


def make_doc(index: int, r: random.Random, names: Names) -> Doc:
    kind = {0: "pdf", 10: "html"}.get(index % 20, "markdown")
    domain = "plant" if index % 2 == 0 else "hospital"
    if domain == "plant":
        machine = r.choice(MACHINES)
        title = f"Procedure {names.code()}: {machine} maintenance at {r.choice(SITES)}"
        headings, subject = PLANT_HEADINGS, machine
    else:
        ward = r.choice(WARDS)
        title = f"Protocol {names.code()}: {r.choice(TOPICS)} on the {ward} ward"
        headings, subject = HOSPITAL_HEADINGS, ward
    doc = Doc(index, kind, domain, title)
    size = 0
    for heading in headings:
        if size >= PAGES * PAGE_CHARS - 900:
            break
        parts = [(2, heading)]
        if r.random() < 0.3:
            parts.append((3, r.choice(SUBHEADINGS)))
        for level, name in parts:
            paragraphs = []
            for _ in range(r.randint(2, 4)):
                paragraph = [filler_sentence(r, domain) for _ in range(r.randint(2, 5))]
                size += sum(len(s) + 1 for s in paragraph) + 2
                paragraphs.append(paragraph)
            doc.sections.append((level, name, paragraphs))
            size += len(name) + 4
    slots = [(s, p) for s, (_, _, ps) in enumerate(doc.sections) for p in range(len(ps))]
    for s, p in r.sample(slots, min(FACTS_PER_DOC, len(slots))):
        make = plant_fact if domain == "plant" else hospital_fact
        templates = PLANT_FACTS if domain == "plant" else HOSPITAL_FACTS
        choice = r.randrange(len(templates))
        sentence, question = make(r, names, subject, choice)
        paragraph = doc.sections[s][2][p]
        paragraph.insert(r.randint(0, len(paragraph)), sentence)
        doc.facts.append(Fact(sentence, question, index, templates[choice]))
    return doc


def write_doc(doc: Doc, folder: Path) -> Path:
    stem = folder / f"{doc.index:04d}-{doc.domain}"
    if doc.kind == "markdown":
        out = [f"# {doc.title}", ""]
        for level, heading, paragraphs in doc.sections:
            out += ["#" * level + " " + heading, ""]
            out += [line for p in paragraphs for line in (" ".join(p), "")]
        path = stem.with_suffix(".md")
        path.write_text("\n".join(out))
        return path
    if doc.kind == "html":
        e = html.escape
        body = [f"<h1>{e(doc.title)}</h1>"]
        for level, heading, paragraphs in doc.sections:
            body.append(f"<h{level}>{e(heading)}</h{level}>")
            body += [f"<p>{e(' '.join(p))}</p>" for p in paragraphs]
        path = stem.with_suffix(".html")
        path.write_text(
            f"<!DOCTYPE html>\n<html><head><title>{e(doc.title)}</title></head><body>\n"
            + "\n".join(body)
            + "\n</body></html>\n"
        )
        return path
    # PDF: a sentence a line (a planted fact is never broken across lines), the lines
    # cut into pages of about PAGE_CHARS.
    lines = [doc.title]
    for _, heading, paragraphs in doc.sections:
        lines += [heading, *(s for p in paragraphs for s in p)]
    pages: list[str] = []
    page: list[str] = []
    for line in lines:
        page.append(line)
        if sum(len(x) + 1 for x in page) >= PAGE_CHARS:
            pages.append("\n".join(page))
            page = []
    if page:
        pages.append("\n".join(page))
    return write_pdf(stem.with_suffix(".pdf"), pages, title=doc.title)


def make_corpus(folder: Path, count: int, seed: int) -> tuple[list[Doc], list[Path]]:
    r = random.Random(seed)
    names = Names(r)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [make_doc(i, r, names) for i in range(count)]
    return docs, [write_doc(d, folder) for d in docs]


# -- figures ------------------------------------------------------------------------


def norm(text: str) -> str:
    return " ".join(text.split())


def pct(values: list[float], q: float) -> float:
    """The q-quantile, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(pct(ms, 0.95), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "n": len(ms),
    }


def rank_scores(ranks: list[int | None]) -> dict[str, float]:
    """recall@1, recall@5 and MRR (over the list's own length) of the labelled ranks."""
    n = len(ranks)
    return {
        "recall_at_1": round(sum(1 for x in ranks if x is not None and x <= 1) / n, 4),
        "recall_at_5": round(sum(1 for x in ranks if x is not None and x <= TOP_K) / n, 4),
        "mrr": round(sum(1 / x for x in ranks if x is not None) / n, 4),
    }


def first_rank(ranks: list[int | None]) -> int | None:
    found = [x for x in ranks if x is not None]
    return min(found) if found else None


# -- the parts ----------------------------------------------------------------------


def ingest(state: Path, folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    started = time.perf_counter()
    done = run_cli(
        "docs", "add", str(folder), "--collection", COLLECTION, "--json",
        state=state, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"appliance docs add failed ({done.returncode}): {done.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return {"wall_s": wall}, rows


def embed_baseline(engine: EmbeddingEngine, by_doc: dict[str, list[Stored]], docs: int) -> float:
    """Passages/s of MiniLM alone on the first ``docs`` documents' passages, a document
    at a time in batches of 32, as `appliance docs add` embeds them."""
    texts = [[p.text for p in by_doc[s]] for s in sorted(by_doc)[:docs]]
    engine.embed_texts(texts[0][:2])
    started = time.perf_counter()
    for doc in texts:
        for i in range(0, len(doc), 32):
            engine.embed_texts(doc[i : i + 32])
    return sum(map(len, texts)) / (time.perf_counter() - started)


def timed_parts(index: Index, question: str, vector: np.ndarray) -> tuple[float, float]:
    """The search's halves timed apart, as Index.search runs them: the FTS5 query (BM25,
    top CANDIDATES) and the cosine scan of every vector with its sort."""
    started = time.perf_counter()
    query = fts_query(question)
    if query is not None:
        with index._lock:
            index._db.execute(
                "SELECT row FROM fts WHERE fts MATCH ? AND collection IN (?) "
                "ORDER BY bm25(fts) LIMIT ?",
                (query, COLLECTION, CANDIDATES),
            ).fetchall()
    middle = time.perf_counter()
    allowed = np.isin(index.collections, [COLLECTION])
    sims = np.where(allowed, index.vectors @ vector.astype(np.float32), -np.inf)
    np.argsort(-sims, kind="stable")[: min(CANDIDATES, int(allowed.sum()))]
    return middle - started, time.perf_counter() - middle


def matching_rows(index: Index, question: str) -> int:
    """How many passages the search's FTS5 query matches (each is scored by bm25())."""
    query = fts_query(question)
    if query is None:
        return 0
    with index._lock:
        return int(
            index._db.execute("SELECT count(*) FROM fts WHERE fts MATCH ?", (query,)).fetchone()[0]
        )


def ttft(client: OpenAI, question: str, grounded: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if grounded:
        extra = {"appliance_grounding": {"collections": [COLLECTION], "top_k": 3}}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage = None
    grounding = None
    stream = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": question}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
        grounding = (chunk.model_extra or {}).get("appliance_grounding") or grounding
    total = time.perf_counter() - started
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {
        "ttft_s": first if first is not None else total,
        "total_s": total,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "cached_tokens": getattr(details, "cached_tokens", None) if details else None,
        "no_source": bool(grounding and grounding.get("no_source")),
        "sources": len(grounding.get("sources", [])) if grounding else 0,
        "text": "".join(text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=670, help="documents written")
    parser.add_argument("--questions", type=int, default=200, help="labelled questions")
    parser.add_argument("--ttft", type=int, default=20, help="questions for time to first token")
    parser.add_argument("--baseline-docs", type=int, default=30, help="embedded alone")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    print(
        f"CPU: {cpu_model()} ({psutil.cpu_count(logical=False)} cores); load average "
        f"before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
        flush=True,
    )
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": psutil.cpu_count(logical=False),
        "load_average_before": list(load_before),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp:
        work = Path(tmp)
        state = garden_state(work)
        settings = load_settings(env={}, overrides={"state_dir": state})
        docs, paths = make_corpus(work / "corpus", args.docs, args.seed)
        kinds = {k: sum(d.kind == k for d in docs) for k in ("markdown", "pdf", "html")}
        print(f"corpus: {len(docs)} documents {kinds}", flush=True)

        # 1. ingest
        phases = {"ingest": os.getloadavg()[0]}
        timing, rows = ingest(state, work / "corpus")
        refused = [r for r in rows if r["status"] == "refused"]
        passages_n = sum(r.get("passages", 0) for r in rows if r["status"] != "refused")
        master = load_master_key(settings.master_key_path, create=False)
        store = DocStore(settings.docs_db_path, master)
        chars = sum(d["chars"] for d in store.documents(COLLECTION))
        pages = chars / PAGE_CHARS
        result["ingest"] = {
            "documents": len(rows),
            "refused": len(refused),
            "kinds": kinds,
            "passages": passages_n,
            "characters": chars,
            "pages": round(pages, 1),
            "wall_s": round(timing["wall_s"], 2),
            "pages_per_s": round(pages / timing["wall_s"], 2),
            "passages_per_s": round(passages_n / timing["wall_s"], 2),
            "passages_in_target": abs(passages_n - TARGET_PASSAGES) <= 0.1 * TARGET_PASSAGES,
        }
        print(
            f"ingested {len(rows)} documents ({len(refused)} refused), {passages_n} passages, "
            f"{pages:.0f} pages in {timing['wall_s']:.1f} s",
            flush=True,
        )
        if refused:
            print(f"  refused: {refused[:3]}", file=sys.stderr)

        # 2. retrieval in this process
        phases["in_process"] = os.getloadavg()[0]
        started = time.perf_counter()
        opened = list(store.active())
        middle = time.perf_counter()
        index = Index(opened, store.generation())
        built = time.perf_counter()
        by_doc: dict[str, list[Stored]] = defaultdict(list)
        for p in opened:
            by_doc[p.source].append(p)
        manifest = load_manifests(settings)[EMBEDDING]
        assert manifest.tokenizer is not None
        engine = EmbeddingEngine(
            settings.models_path / manifest.file,
            settings.models_path / manifest.tokenizer.file,
            threads=psutil.cpu_count(logical=False) or 1,
            max_input_tokens=manifest.context_length or 256,
        )
        baseline = embed_baseline(engine, by_doc, args.baseline_docs)
        result["ingest"]["embed_only_passages_per_s"] = round(baseline, 2)
        result["ingest"]["embed_share_estimate"] = round(
            passages_n / baseline / timing["wall_s"], 3
        )
        result["index"] = {
            "passages": len(index),
            "open_s": round(middle - started, 3),
            "build_s": round(built - middle, 3),
            "total_s": round(built - started, 3),
        }

        # the labelled questions: facts whose sentence is in a passage of their document
        r = random.Random(args.seed + 1)
        facts = [f for d in docs for f in d.facts]
        r.shuffle(facts)
        source_of = {d.index: str(p.resolve()) for d, p in zip(docs, paths, strict=True)}
        labelled: list[tuple[Fact, set[int]]] = []
        unlabelled = 0
        for fact in facts:
            if len(labelled) == args.questions:
                break
            wanted = norm(fact.sentence)
            ids = {p.id for p in by_doc[source_of[fact.doc]] if wanted in norm(p.text)}
            if ids:
                labelled.append((fact, ids))
            else:
                unlabelled += 1
        by_kind = defaultdict(int)
        for fact, _ in labelled:
            by_kind[docs[fact.doc].kind] += 1

        # The fusion weight, calibrated as `appliance docs calibrate` does, on other
        # labelled questions than those measured below (the next ones).
        calibration: list[tuple[Fact, set[int]]] = []
        for fact in facts[len(labelled) + unlabelled :]:
            if len(calibration) == CALIBRATION_QUESTIONS:
                break
            wanted = norm(fact.sentence)
            ids = {p.id for p in by_doc[source_of[fact.doc]] if wanted in norm(p.text)}
            if ids:
                calibration.append((fact, ids))
        cal_vectors = engine.embed_texts([f.question for f, _ in calibration])
        recalls = {}
        for w in WEIGHTS:
            found = 0
            for (fact, ids), vec in zip(calibration, cal_vectors, strict=True):
                got = index.search(fact.question, vec, [COLLECTION], TOP_K, w)
                found += any(h.passage.id in ids for h in got)
            recalls[w] = found / len(calibration)
        weight = best_weight(recalls)
        store.set_calibration(COLLECTION, None, weight)  # the server searches with it too
        result["fusion_calibration"] = {
            "questions": len(calibration),
            "recall_at_5_by_weight": {str(w): round(r, 4) for w, r in recalls.items()},
            "vector_weight": weight,
        }

        search_s, both_s, fts_s, scan_s, matched = [], [], [], [], []
        fused, text, vector = [], [], []
        similarities: list[float] = []
        top5: dict[str, list[int]] = {}
        for fact, ids in labelled:
            q = fact.question
            t0 = time.perf_counter()
            vec = engine.embed_texts([q])[0]
            t1 = time.perf_counter()
            hits = index.search(q, vec, [COLLECTION], TOP_K, weight)
            t2 = time.perf_counter()
            search_s.append(t2 - t1)
            both_s.append(t2 - t0)
            a, b = timed_parts(index, q, vec)
            matched.append(matching_rows(index, q))
            fts_s.append(a)
            scan_s.append(b)
            every = index.search(q, vec, [COLLECTION], 2 * CANDIDATES, weight)  # lists whole
            assert [h.passage.id for h in every[:TOP_K]] == [h.passage.id for h in hits]
            top5[q] = [h.passage.id for h in hits]
            similarities.append(hits[0].similarity if hits else 0.0)
            fused.append(
                first_rank([i for i, h in enumerate(every, 1) if h.passage.id in ids] or [None])
            )
            text.append(first_rank([h.text_rank for h in every if h.passage.id in ids] or [None]))
            vector.append(
                first_rank([h.vector_rank for h in every if h.passage.id in ids] or [None])
            )
        engine.close()
        threshold = settings.retrieval_min_similarity / 100
        result["latency_in_process"] = {
            "embed_and_search": summary_ms(both_s),
            "search": summary_ms(search_s),
            "search_fts_part": summary_ms(fts_s),
            "search_vector_part": summary_ms(scan_s),
            "fts_rows_matched_median": statistics.median(matched),
            "target_search_p50_ms": SEARCH_P50_TARGET_MS,
            "met": statistics.median(search_s) * 1000 <= SEARCH_P50_TARGET_MS,
        }
        result["recall"] = {
            "questions": len(labelled),
            "by_kind": dict(by_kind),
            "facts_without_a_passage": unlabelled,
            "labelled_with_two_passages": sum(len(ids) > 1 for _, ids in labelled),
            "fused": rank_scores(fused),
            "bm25_only": rank_scores(text),
            "vectors_only": rank_scores(vector),
            "target_recall_at_5": RECALL_TARGET,
            "met": rank_scores(fused)["recall_at_5"] >= RECALL_TARGET,
            "top_similarity_below_threshold": sum(s < threshold for s in similarities),
            "threshold": threshold,
        }
        per_template = Counter(f.template for f in facts)
        ranks = [
            {
                "question": f.question,
                "fact": f.sentence,
                "kind": docs[f.doc].kind,
                "template": f.template,
                "facts_of_template_in_corpus": per_template[f.template],
                "fused_rank": a,
                "bm25_rank": b,
                "vector_rank": c,
            }
            for (f, _), a, b, c in zip(labelled, fused, text, vector, strict=True)
        ]
        misses = [x for x in ranks if x["fused_rank"] is None or x["fused_rank"] > TOP_K]
        result["recall"]["misses_anatomy"] = {
            "misses": len(misses),
            "bm25_top5": sum(1 for x in misses if (x["bm25_rank"] or 99) <= TOP_K),
            "bm25_rank1": sum(1 for x in misses if x["bm25_rank"] == 1),
            "vector_absent_from_top50": sum(1 for x in misses if x["vector_rank"] is None),
            "labelled_absent_from_vector_top50_all": sum(
                1 for x in ranks if x["vector_rank"] is None
            ),
        }
        result["recall"]["facts_per_template_in_corpus"] = dict(per_template)
        result["recall"]["per_question"] = ranks
        result["recall"]["misses"] = misses[:20]
        store.close()

        # 2b. and 4. through the server
        phases["server"] = os.getloadavg()[0]
        server = start_server(state, "--keep-alive", "-1")
        try:
            http = server.client(timeout=300)
            questions = [f.question for f, _ in labelled]
            body = {"query": questions[0], "collections": [COLLECTION], "top_k": TOP_K}
            started = time.perf_counter()
            first = http.post("/v1/retrieve", json=body)
            first_s = time.perf_counter() - started
            if first.status_code != 200:
                sys.exit(f"POST /v1/retrieve: {first.status_code} {first.text[:2000]}")
            served_s, same = [], 0
            for q in questions:
                body = {"query": q, "collections": [COLLECTION], "top_k": TOP_K}
                started = time.perf_counter()
                reply = http.post("/v1/retrieve", json=body)
                served_s.append(time.perf_counter() - started)
                reply.raise_for_status()
                same += [h["passage_id"] for h in reply.json()["data"]] == top5[q]
            result["latency_server"] = {
                "retrieve": summary_ms(served_s),
                "first_request_s": round(first_s, 2),
                "same_top5_as_in_process": round(same / len(questions), 4),
            }
            print("retrieval timed; time to first token ...", flush=True)

            client = OpenAI(
                base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=300
            )
            client.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "hello"}], max_tokens=2
            )
            # questions whose sources pass the relevance threshold (else no model runs)
            asked = [
                q
                for (f, _), s in zip(labelled, similarities, strict=True)
                if s >= threshold
                for q in [f.question]
            ][: args.ttft]
            runs: dict[str, list[dict[str, Any]]] = {"ungrounded": [], "grounded": [], "again": []}
            for q in asked:
                runs["ungrounded"].append(ttft(client, q, grounded=False))
                runs["grounded"].append(ttft(client, q, grounded=True))
                runs["again"].append(ttft(client, q, grounded=True))
            http.close()
        finally:
            server.stop()

    def side(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **summary_ms([x["ttft_s"] for x in rs]),
            "prompt_tokens_mean": round(statistics.fmean(x["prompt_tokens"] or 0 for x in rs), 1),
            "cached_tokens_mean": round(statistics.fmean(x["cached_tokens"] or 0 for x in rs), 1),
            "no_source": sum(x["no_source"] for x in rs),
        }

    t = {k: side(v) for k, v in runs.items()}
    t["grounded_over_ungrounded"] = round(t["grounded"]["p50_ms"] / t["ungrounded"]["p50_ms"], 2)
    t["again_over_grounded"] = round(t["again"]["p50_ms"] / t["grounded"]["p50_ms"], 2)
    t["requests"] = {k: [{n: x[n] for n in x if n != "text"} for x in v] for k, v in runs.items()}
    t["examples"] = [
        {"question": q, "ungrounded": u["text"], "grounded": g["text"]}
        for q, u, g in list(zip(asked, runs["ungrounded"], runs["grounded"], strict=True))[:3]
    ]
    result["ttft"] = t
    result["load_average_at_phase_start"] = phases
    result["load_average_after"] = list(os.getloadavg())
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


def report(result: dict[str, Any]) -> None:
    def yes(ok: bool) -> str:
        return "met" if ok else "MISSED"

    i = result["ingest"]
    x = result["index"]
    lat = result["latency_in_process"]
    srv = result["latency_server"]
    rc = result["recall"]
    t = result["ttft"]
    print()
    print(
        f"ingest: {i['documents']} documents ({i['kinds']['pdf']} PDF, {i['kinds']['html']} "
        f"HTML), {i['pages']:.0f} pages of {PAGE_CHARS} chars, {i['passages']} passages "
        f"(target {TARGET_PASSAGES} +- 10 %: {yes(i['passages_in_target'])})"
    )
    print(
        f"  `appliance docs add`: {i['wall_s']:.1f} s = {i['pages_per_s']:.2f} pages/s, "
        f"{i['passages_per_s']:.1f} passages/s; MiniLM alone in-process "
        f"{i['embed_only_passages_per_s']:.1f} passages/s (embedding ~"
        f"{100 * i['embed_share_estimate']:.0f} % of the wall time)"
    )
    print(
        f"index of {x['passages']} passages: {x['total_s']:.2f} s "
        f"({x['open_s']:.2f} s opening the sealed rows, {x['build_s']:.2f} s FTS5 + vectors)"
    )
    print(f"  {'latency (ms)':34} {'p50':>8} {'p95':>8} {'mean':>8}")
    rows = [
        ("in-process search (top 5)", lat["search"]),
        ("  its BM25 (FTS5) part", lat["search_fts_part"]),
        ("  its cosine-scan part", lat["search_vector_part"]),
        ("in-process embed + search", lat["embed_and_search"]),
        ("POST /v1/retrieve end to end", srv["retrieve"]),
    ]
    for name, s in rows:
        print(f"  {name:34} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} {s['mean_ms']:8.2f}")
    print(
        f"  search p50 target <= {SEARCH_P50_TARGET_MS:.0f} ms: {yes(lat['met'])}; server's "
        f"first retrieve (index build, MiniLM load) {srv['first_request_s']:.2f} s; "
        f"server top 5 == in-process: {100 * srv['same_top5_as_in_process']:.0f} %"
    )
    print(
        f"  the FTS5 query (the question's words but common ones, OR) matches a median "
        f"{lat['fts_rows_matched_median']:.0f} of {x['passages']} passages, each scored"
    )
    print(
        f"recall on {rc['questions']} paraphrased facts ({dict(rc['by_kind'])}; "
        f"{rc['labelled_with_two_passages']} facts in two overlapping passages):"
    )
    fc = result["fusion_calibration"]
    print(
        f"  fusion weight of the embeddings, calibrated on {fc['questions']} other questions: "
        f"{fc['vector_weight']} (recall@5 by weight {fc['recall_at_5_by_weight']})"
    )
    print(f"  {'ranking':14} {'recall@1':>9} {'recall@5':>9} {'MRR':>7}")
    for name in ("fused", "bm25_only", "vectors_only"):
        s = rc[name]
        print(f"  {name:14} {s['recall_at_1']:9.3f} {s['recall_at_5']:9.3f} {s['mrr']:7.3f}")
    print(
        f"  recall@5 target >= {RECALL_TARGET}: {yes(rc['met'])}; fusion's gain over the "
        f"best single list: "
        f"{rc['fused']['recall_at_5'] - max(rc['bm25_only']['recall_at_5'], rc['vectors_only']['recall_at_5']):+.3f}"  # noqa: E501
    )
    print(
        f"  {rc['top_similarity_below_threshold']} questions' best passage is under the "
        f"relevance threshold {rc['threshold']:.2f} (a grounded answer would say no source)"
    )
    m = rc["misses_anatomy"]
    per = rc["facts_per_template_in_corpus"].values()
    print(
        f"  fused misses: {m['misses']}; of them {m['bm25_top5']} had the passage in BM25's "
        f"top 5 ({m['bm25_rank1']} at rank 1) and {m['vector_absent_from_top50']} had it "
        f"outside the vector list's top {CANDIDATES} (all questions: "
        f"{m['labelled_absent_from_vector_top50_all']}); each kind of fact recurs "
        f"{min(per)}-{max(per)} times in the corpus, told apart only by its code"
    )
    for miss in rc["misses"][:3]:
        print(
            f"  missed ({miss['kind']}, ranks fused/BM25/vector {miss['fused_rank']}/"
            f"{miss['bm25_rank']}/{miss['vector_rank']}): {miss['question']!r} <- "
            f"{miss['fact']!r}"
        )
    print(f"time to first token, {BASE}, {t['grounded']['n']} questions:")
    print(f"  {'request':24} {'p50 ms':>8} {'p95 ms':>8} {'prompt tok':>11} {'cached tok':>11}")
    for name, label in (
        ("ungrounded", "ungrounded"),
        ("grounded", "grounded (top 3)"),
        ("again", "grounded, asked again"),
    ):
        s = t[name]
        print(
            f"  {label:24} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} "
            f"{s['prompt_tokens_mean']:11.1f} {s['cached_tokens_mean']:11.1f}"
        )
    g, u, a = t["grounded"], t["ungrounded"], t["again"]
    fresh = (g["prompt_tokens_mean"] - g["cached_tokens_mean"]) - (
        u["prompt_tokens_mean"] - u["cached_tokens_mean"]
    )
    extra = g["p50_ms"] - u["p50_ms"]
    retrieval = lat["embed_and_search"]["p50_ms"]
    print(
        f"  grounded / ungrounded p50: {t['grounded_over_ungrounded']:.2f}x: +{extra:.0f} ms, "
        f"the retrieval (embed + search, ~{retrieval:.0f} ms) and prompt processing of "
        f"~{fresh:.0f} more tokens (the 3 passages and the instruction): "
        f"~{(extra - retrieval) / max(fresh, 1):.2f} ms a token"
    )
    print(
        f"  asked again / first grounded p50: {t['again_over_grounded']:.2f}x: reusing "
        f"~{a['cached_tokens_mean']:.0f} cached prompt tokens saves "
        f"{g['p50_ms'] - a['p50_ms']:.0f} ms; no-source answers: "
        f"{g['no_source']} + {a['no_source']}"
    )
    loads = " ".join(f"{k} {v:.2f}" for k, v in result["load_average_at_phase_start"].items())
    print(f"1-minute load average at each phase's start: {loads}")


if __name__ == "__main__":
    main()
