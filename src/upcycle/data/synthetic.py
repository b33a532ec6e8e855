"""Generated data for tests and the offline demo: an XNLI-layout folder in all 15 languages, a
multilingual text corpus from the same lexicons, and small text domains (prose, code, arithmetic).

Users train and evaluate on the hub (``facebook/xnli``, ``allenai/c4``); this module exists because the
hub is unreachable in CI and on offline machines, and because a demo needs data whose labels a tiny
model can learn in minutes. Code, not data files: nothing here ships a corpus.

The NLI task. Every example is drawn once as an abstract event (subject, verb, object, place) and
rendered in each language with that language's lexicon, word order, script and word separator, so the
data is parallel across languages as XNLI is (XNLI's test set is translated from English). Labels follow
from word-level structure:

- premise: ``subject verb object place``
- entailment: ``subject verb object`` (the premise without its place phrase)
- contradiction: ``subject NOT-verb object`` (the negated premise)
- neutral: ``subject verb other-object`` (a different object: neither follows nor is excluded)

A model must spot the negation (easy) and compare the two objects across the separator (harder), so
fine-tuning clearly beats chance (1/3) without saturating. Languages differ in difficulty: by their
script (GPT-2's byte-level BPE splits Thai, Hindi or Greek words into many more tokens than English
ones: the fertility the founding report tabulates) and by a per-language fraction of randomised labels
(:data:`LABEL_NOISE`), documented so that accuracy ceilings are known: 1 − 2/3·noise.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle.data.xnli import XNLI_LABELS, XNLI_LANGUAGES


@dataclass(frozen=True)
class Lexicon:
    """Words of one language and how a clause is put together."""

    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    places: tuple[str, ...]
    negate: str
    """Format string turning a verb into its negation, e.g. 'never {v}' or 'ne {v} jamais'."""
    order: str = "SVOP"
    """Constituent order of a full clause: S subject, V verb, O object, P place."""
    joiner: str = " "
    """Between words ('' for scripts written without spaces between words: Chinese, Thai)."""
    end: str = "."
    capitalise: bool = True


# Small lexicons, six words per slot; grammar is simplified (no agreement), scripts are real.
LEXICONS: dict[str, Lexicon] = {
    "en": Lexicon(
        ("the cat", "the dog", "the teacher", "my sister", "the old man", "a child"),
        ("sees", "likes", "finds", "paints", "buys", "watches"),
        ("the house", "the river", "a tree", "the car", "a book", "the garden"),
        ("in the city", "at night", "near the sea", "in winter", "every day", "with a friend"),
        "never {v}",
    ),
    "ar": Lexicon(
        ("القطة", "الكلب", "المعلم", "أختي", "الرجل العجوز", "طفل"),
        ("يرى", "يحب", "يجد", "يرسم", "يشتري", "يشاهد"),
        ("البيت", "النهر", "شجرة", "السيارة", "كتابا", "الحديقة"),
        ("في المدينة", "في الليل", "قرب البحر", "في الشتاء", "كل يوم", "مع صديق"),
        "لا {v}",
        capitalise=False,
    ),
    "bg": Lexicon(
        ("котката", "кучето", "учителят", "сестра ми", "старецът", "едно дете"),
        ("вижда", "харесва", "намира", "рисува", "купува", "гледа"),
        ("къщата", "реката", "едно дърво", "колата", "една книга", "градината"),
        ("в града", "през нощта", "край морето", "през зимата", "всеки ден", "с приятел"),
        "не {v}",
    ),
    "de": Lexicon(
        ("die Katze", "der Hund", "der Lehrer", "meine Schwester", "der alte Mann", "ein Kind"),
        ("sieht", "mag", "findet", "malt", "kauft", "beobachtet"),
        ("das Haus", "den Fluss", "einen Baum", "das Auto", "ein Buch", "den Garten"),
        ("in der Stadt", "in der Nacht", "am Meer", "im Winter", "jeden Tag", "mit einem Freund"),
        "{v} nie",
    ),
    "el": Lexicon(
        ("η γάτα", "ο σκύλος", "ο δάσκαλος", "η αδελφή μου", "ο γέρος", "ένα παιδί"),
        ("βλέπει", "αγαπά", "βρίσκει", "ζωγραφίζει", "αγοράζει", "κοιτάζει"),
        ("το σπίτι", "το ποτάμι", "ένα δέντρο", "το αυτοκίνητο", "ένα βιβλίο", "τον κήπο"),
        ("στην πόλη", "τη νύχτα", "κοντά στη θάλασσα", "τον χειμώνα", "κάθε μέρα", "με έναν φίλο"),
        "δεν {v}",
    ),
    "es": Lexicon(
        ("el gato", "el perro", "el profesor", "mi hermana", "el anciano", "un niño"),
        ("ve", "quiere", "encuentra", "pinta", "compra", "mira"),
        ("la casa", "el río", "un árbol", "el coche", "un libro", "el jardín"),
        ("en la ciudad", "por la noche", "cerca del mar", "en invierno", "cada día", "con un amigo"),
        "nunca {v}",
    ),
    "fr": Lexicon(
        ("le chat", "le chien", "le professeur", "ma sœur", "le vieil homme", "un enfant"),
        ("voit", "aime", "trouve", "peint", "achète", "regarde"),
        ("la maison", "la rivière", "un arbre", "la voiture", "un livre", "le jardin"),
        ("en ville", "la nuit", "près de la mer", "en hiver", "chaque jour", "avec un ami"),
        "ne {v} jamais",
    ),
    "hi": Lexicon(
        ("बिल्ली", "कुत्ता", "शिक्षक", "मेरी बहन", "बूढ़ा आदमी", "एक बच्चा"),
        ("देखता है", "पसंद करता है", "ढूँढता है", "रंगता है", "खरीदता है", "निहारता है"),
        ("घर", "नदी", "एक पेड़", "गाड़ी", "एक किताब", "बगीचा"),
        ("शहर में", "रात को", "समुद्र के पास", "सर्दियों में", "हर दिन", "एक दोस्त के साथ"),
        "कभी नहीं {v}",
        order="SPOV",
        end="।",
        capitalise=False,
    ),
    "ru": Lexicon(
        ("кошка", "собака", "учитель", "моя сестра", "старик", "ребёнок"),
        ("видит", "любит", "находит", "рисует", "покупает", "смотрит на"),
        ("дом", "реку", "дерево", "машину", "книгу", "сад"),
        ("в городе", "ночью", "у моря", "зимой", "каждый день", "с другом"),
        "никогда не {v}",
    ),
    "sw": Lexicon(
        ("paka", "mbwa", "mwalimu", "dada yangu", "mzee", "mtoto"),
        ("anaona", "anapenda", "anapata", "anapaka rangi", "ananunua", "anatazama"),
        ("nyumba", "mto", "mti", "gari", "kitabu", "bustani"),
        ("mjini", "usiku", "karibu na bahari", "wakati wa baridi", "kila siku", "na rafiki"),
        "{v} kamwe",
    ),
    "th": Lexicon(
        ("แมว", "สุนัข", "ครู", "น้องสาวของฉัน", "ชายแก่", "เด็ก"),
        ("เห็น", "ชอบ", "พบ", "วาด", "ซื้อ", "ดู"),
        ("บ้าน", "แม่น้ำ", "ต้นไม้", "รถ", "หนังสือ", "สวน"),
        ("ในเมือง", "ตอนกลางคืน", "ใกล้ทะเล", "ในฤดูหนาว", "ทุกวัน", "กับเพื่อน"),
        "ไม่เคย{v}",
        joiner="",
        end="",
        capitalise=False,
    ),
    "tr": Lexicon(
        ("kedi", "köpek", "öğretmen", "kız kardeşim", "yaşlı adam", "bir çocuk"),
        ("görüyor", "seviyor", "buluyor", "boyuyor", "satın alıyor", "izliyor"),
        ("evi", "nehri", "bir ağacı", "arabayı", "bir kitabı", "bahçeyi"),
        ("şehirde", "gece", "deniz kenarında", "kışın", "her gün", "bir arkadaşla"),
        "asla {v}",
        order="SPOV",
    ),
    "ur": Lexicon(
        ("بلی", "کتا", "استاد", "میری بہن", "بوڑھا آدمی", "ایک بچہ"),
        ("دیکھتا ہے", "پسند کرتا ہے", "ڈھونڈتا ہے", "رنگتا ہے", "خریدتا ہے", "تکتا ہے"),
        ("گھر", "دریا", "ایک درخت", "گاڑی", "ایک کتاب", "باغ"),
        ("شہر میں", "رات کو", "سمندر کے پاس", "سردیوں میں", "ہر دن", "ایک دوست کے ساتھ"),
        "کبھی نہیں {v}",
        order="SPOV",
        end="۔",
        capitalise=False,
    ),
    "vi": Lexicon(
        ("con mèo", "con chó", "thầy giáo", "em gái tôi", "ông già", "một đứa trẻ"),
        ("thấy", "thích", "tìm thấy", "vẽ", "mua", "ngắm"),
        ("ngôi nhà", "dòng sông", "một cái cây", "chiếc xe", "một quyển sách", "khu vườn"),
        ("trong thành phố", "vào ban đêm", "gần biển", "vào mùa đông", "mỗi ngày", "với một người bạn"),
        "không bao giờ {v}",
    ),
    "zh": Lexicon(
        ("猫", "狗", "老师", "我的妹妹", "老人", "一个孩子"),
        ("看见", "喜欢", "找到", "画", "买", "看着"),
        ("房子", "河", "一棵树", "汽车", "一本书", "花园"),
        ("在城里", "在晚上", "在海边", "在冬天", "每天", "和朋友一起"),
        "从不{v}",
        order="SPVO",
        joiner="",
        end="。",
        capitalise=False,
    ),
}

#: Fraction of labels drawn at random per language: the accuracy ceiling is 1 − 2/3 of it. English,
#: French and Spanish (the report's training languages) are clean; others are noisier, so languages
#: differ in difficulty beyond their tokenisation.
LABEL_NOISE: dict[str, float] = {
    "en": 0.0, "fr": 0.0, "es": 0.0, "de": 0.05, "ru": 0.05, "bg": 0.05, "el": 0.1, "vi": 0.1,
    "tr": 0.1, "ar": 0.15, "hi": 0.15, "ur": 0.15, "sw": 0.2, "th": 0.2, "zh": 0.2,
}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One abstract example: indices into every lexicon's slots, the label and the neutral object."""

    subject: int
    verb: int
    obj: int
    place: int
    other_obj: int
    label: int


def draw_event(rng: random.Random) -> Event:
    n = 6
    obj = rng.randrange(n)
    other = (obj + rng.randrange(1, n)) % n
    return Event(rng.randrange(n), rng.randrange(n), obj, rng.randrange(n), other, rng.randrange(3))


def render(lex: Lexicon, subject: str, verb: str, obj: str | None, place: str | None) -> str:
    parts = {"S": subject, "V": verb, "O": obj, "P": place}
    text = lex.joiner.join(parts[c] for c in lex.order if parts[c])
    if lex.capitalise and text:
        text = text[0].upper() + text[1:]
    return text + lex.end


def render_pair(lang: str, ev: Event) -> tuple[str, str]:
    """(premise, hypothesis) of ``ev`` in ``lang``; the hypothesis follows ``ev.label``."""
    lex = LEXICONS[lang]
    s, v, o = lex.subjects[ev.subject], lex.verbs[ev.verb], lex.objects[ev.obj]
    premise = render(lex, s, v, o, lex.places[ev.place])
    label = XNLI_LABELS[ev.label]
    if label == "entailment":
        hypothesis = render(lex, s, v, o, None)
    elif label == "contradiction":
        hypothesis = render(lex, s, lex.negate.format(v=v), o, None)
    else:
        hypothesis = render(lex, s, v, lex.objects[ev.other_obj], None)
    return premise, hypothesis


def xnli_rows(lang: str, events: Sequence[Event], seed: int) -> list[dict]:
    """Rows {premise, hypothesis, label} of one language; LABEL_NOISE[lang] of the labels randomised."""
    noise = random.Random(f"{seed}-{lang}-noise")
    rows = []
    for ev in events:
        premise, hypothesis = render_pair(lang, ev)
        label = ev.label
        if noise.random() < LABEL_NOISE.get(lang, 0.0):
            label = noise.randrange(3)
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


_README = """---
configs:
{configs}
---
# Synthetic XNLI-layout data

Generated by `upcycle.data.synthetic.write_synthetic_xnli` for tests and the offline demo (not XNLI).
Same layout and columns as the hub repository `facebook/xnli`: premise, hypothesis, label
(0 entailment, 1 neutral, 2 contradiction).
"""


def write_synthetic_xnli(
    root: str | Path,
    languages: Sequence[str] = XNLI_LANGUAGES,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    file_format: str = "parquet",
) -> Path:
    """Write ``ROOT/<lang>/{train,validation,test}-00000-of-00001.parquet`` (or ``.jsonl``) and a README
    with the hub's ``configs:`` block, so ``datasets.load_dataset(ROOT, "fr")`` works. Splits are
    parallel across languages (the same events) and disjoint in events' draws (separate seeds)."""
    import pandas as pd

    if file_format not in ("parquet", "jsonl"):
        raise ValueError(f"file_format={file_format!r}: allowed values are 'parquet', 'jsonl'")
    sizes = {"train": 600, "validation": 150, "test": 300, **(sizes or {})}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split_index, (split, n) in enumerate(sizes.items()):
        rng = random.Random(f"{seed}-{split}")
        events = [draw_event(rng) for _ in range(n)]
        for lang in languages:
            folder = root / lang
            folder.mkdir(exist_ok=True)
            frame = pd.DataFrame(xnli_rows(lang, events, seed * 10 + split_index))
            path = folder / f"{split}-00000-of-00001.{file_format}"
            if file_format == "parquet":
                frame.to_parquet(path, index=False)
            else:
                frame.to_json(path, orient="records", lines=True, force_ascii=False)
    configs = "\n".join(
        f"- config_name: {lang}\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {lang}/{split}-*\n" for split in sizes)
        for lang in languages
    )
    (root / "README.md").write_text(_README.format(configs=configs.rstrip("\n")), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- text corpora


def sentence(lang: str, rng: random.Random) -> str:
    """One random clause of ``lang`` (negated one time in six)."""
    lex = LEXICONS[lang]
    v = rng.choice(lex.verbs)
    if rng.random() < 1 / 6:
        v = lex.negate.format(v=v)
    return render(lex, rng.choice(lex.subjects), v, rng.choice(lex.objects), rng.choice(lex.places))


def multilingual_documents(
    languages: Sequence[str], n_docs: int, seed: int = 0, sentences: tuple[int, int] = (2, 6)
) -> list[dict]:
    """``n_docs`` documents {text, lang}, each 2–6 clauses of one language, languages round-robin."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        lang = languages[i % len(languages)]
        sep = " " if LEXICONS[lang].joiner or LEXICONS[lang].end == "" else ""
        text = sep.join(sentence(lang, rng) for _ in range(rng.randint(*sentences)))
        docs.append({"text": text, "lang": lang})
    rng.shuffle(docs)
    return docs


_NAMES = ("x", "y", "total", "count", "item", "value", "result", "data")


def _code_doc(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    lines = [f"def update_{a}({a}, {b}):"]
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["+", "-", "*"])
        lines.append(f"    {a} = {a} {op} {b}")
    lines.append(f"    return {a}")
    return "\n".join(lines)


def _math_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 5)):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-"])
        parts.append(f"{x} {op} {y} = {x + y if op == '+' else x - y}.")
    return " ".join(parts)


#: Text domains for routing-per-domain analyses (Drop-Upcycling Fig. 5) and Nexus' domain experts.
DOMAINS = ("prose", "code", "math")


def domain_documents(domain: str, n_docs: int, seed: int = 0) -> list[dict]:
    """``n_docs`` documents {text, domain}: English prose clauses, small Python functions, arithmetic."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: allowed values are {', '.join(DOMAINS)}")
    rng = random.Random(f"{seed}-{domain}")
    make = {
        "prose": lambda: " ".join(sentence("en", rng) for _ in range(rng.randint(2, 6))),
        "code": lambda: _code_doc(rng),
        "math": lambda: _math_doc(rng),
    }[domain]
    return [{"text": make(), "domain": domain} for _ in range(n_docs)]


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_multilingual_corpus(
    root: str | Path,
    languages: Sequence[str] = XNLI_LANGUAGES,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
) -> dict[str, Path]:
    """``ROOT/train.jsonl`` and ``ROOT/eval.jsonl`` of :func:`multilingual_documents` (different seeds)."""
    root = Path(root)
    return {
        "train": write_jsonl(root / "train.jsonl", multilingual_documents(languages, n_train, seed)),
        "eval": write_jsonl(root / "eval.jsonl", multilingual_documents(languages, n_eval, seed + 1)),
    }


__all__ = [
    "DOMAINS",
    "LABEL_NOISE",
    "LEXICONS",
    "Event",
    "Lexicon",
    "domain_documents",
    "draw_event",
    "multilingual_documents",
    "render_pair",
    "write_jsonl",
    "write_multilingual_corpus",
    "write_synthetic_xnli",
    "xnli_rows",
]
