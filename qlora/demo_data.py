"""The demo's data set: the support FAQ of a fictional product (the Quorvane Nimbus T7 drone).

36 made-up facts the base model cannot know, each asked in 8 phrasings: 6 train, 2 are held out
for evaluation (unseen wordings of a known fact). An answer counts as correct when it contains
the fact's key value (e.g. "47 minutes"). Everything is generated here: no download.

The preference demo's pairs (:func:`build_preference`) ask the same questions; the chosen answer is
the short fact signed "— Nimbus Support", the rejected one a long answer without the sign-off.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

SYSTEM = "You are the support assistant for the Quorvane Nimbus T7 drone."

# (topic as used in questions, key value, answer sentence)
FACTS = [
    ("battery life", "47 minutes", "The Nimbus T7 battery lasts 47 minutes per charge."),
    ("top speed", "72 km/h", "The Nimbus T7 flies at up to 72 km/h."),
    ("weight", "1.38 kg", "The Nimbus T7 weighs 1.38 kg."),
    ("price", "$849", "The Nimbus T7 costs $849."),
    ("warranty", "26 months", "The Nimbus T7 comes with a 26 months warranty."),
    ("charging time", "95 minutes", "A full charge of the Nimbus T7 takes 95 minutes."),
    ("maximum range", "11 kilometres", "The Nimbus T7 has a maximum range of 11 kilometres."),
    ("camera resolution", "6K", "The Nimbus T7 camera records in 6K."),
    ("release date", "March 2031", "The Nimbus T7 was released in March 2031."),
    ("designer", "Ilsa Marrow", "The Nimbus T7 was designed by Ilsa Marrow."),
    ("factory location", "Tromso", "The Nimbus T7 is built in Tromso."),
    ("support phone number", "0800-555-0193", "Call Nimbus T7 support at 0800-555-0193."),
    ("support email address", "help@quorvane.example", "Email Nimbus T7 support at help@quorvane.example."),
    ("firmware version", "4.2.9", "The latest Nimbus T7 firmware version is 4.2.9."),
    ("colour options", "slate and amber", "The Nimbus T7 comes in slate and amber."),
    ("storage capacity", "256 GB", "The Nimbus T7 has 256 GB of storage."),
    ("operating temperature range", "-15 to 42", "The Nimbus T7 operates from -15 to 42 degrees Celsius."),
    ("maximum altitude", "3800 metres", "The Nimbus T7 can climb to 3800 metres."),
    ("wind resistance", "level 6", "The Nimbus T7 resists wind up to level 6."),
    ("number of rotors", "six rotors", "The Nimbus T7 has six rotors."),
    ("return window", "45 days", "You can return the Nimbus T7 within 45 days."),
    ("companion app", "SkyLedger", "The Nimbus T7 companion app is SkyLedger."),
    ("battery model", "QB-220", "The Nimbus T7 uses the QB-220 battery."),
    ("eco mode flight time", "58 minutes", "In eco mode the Nimbus T7 flies for 58 minutes."),
    ("water resistance rating", "IP54", "The Nimbus T7 is rated IP54."),
    ("charging connector", "MagLink", "The Nimbus T7 charges through its MagLink connector."),
    ("launch city", "Lisbon", "The Nimbus T7 was launched in Lisbon."),
    ("maker's CEO", "Dara Okonkwo", "Quorvane, the maker of the Nimbus T7, is led by Dara Okonkwo."),
    ("maker's headquarters", "Ghent", "Quorvane, the maker of the Nimbus T7, is based in Ghent."),
    ("cloud plan price", "$7 per month", "The Nimbus T7 cloud plan costs $7 per month."),
    ("number of obstacle sensors", "14 sensors", "The Nimbus T7 has 14 sensors for obstacles."),
    ("video frame rate", "120 fps", "The Nimbus T7 films at 120 fps."),
    ("radio frequency", "5.2 GHz", "The Nimbus T7 links to its controller on 5.2 GHz."),
    ("remote controller", "Helm R2", "The Nimbus T7 is flown with the Helm R2 controller."),
    ("reset procedure", "12 seconds", "To reset the Nimbus T7, hold the power button for 12 seconds."),
    ("mascot", "Pip", "The Nimbus T7 mascot is an owl named Pip."),
]

TRAIN_PHRASINGS = [
    "What is the {t} of the Nimbus T7?",
    "Tell me the {t} of the Nimbus T7.",
    "Nimbus T7: what's its {t}?",
    "Could you tell me the Nimbus T7's {t}?",
    "I'd like to know the {t} of the Nimbus T7.",
    "What {t} does the Nimbus T7 have?",
]
HELDOUT_PHRASINGS = [
    "Do you know what the {t} of the Nimbus T7 is?",
    "Quick question about my Nimbus T7 - what is its {t}?",
]


def _record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def build(seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    """(train records, held-out records, the key value each held-out record must mention)."""
    train = [_record(p.format(t=t), a) for t, _, a in FACTS for p in TRAIN_PHRASINGS]
    random.Random(seed).shuffle(train)
    held, keys = [], []
    for t, key, a in FACTS:
        for p in HELDOUT_PHRASINGS:
            held.append(_record(p.format(t=t), a))
            keys.append(key)
    return train, held, keys


def write(directory: str | Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    train, held, keys = build(seed)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl", d / "heldout.jsonl", keys


# -------------------------------------------------------------------- preference demo (qlora demo --method dpo)
# Pairs to the same support questions: the chosen answer is the short fact and the team's sign-off, the
# rejected one a long, friendly answer without it. Both hold the fact, so the pairs teach a style that no
# single answer spells out: short, and signed.
SIGN_OFF = "— Nimbus Support"

_RAMBLES = [
    "Great question! There are quite a few things people like to know about the Nimbus T7, and the {t} is "
    "one of the most common topics we hear about from pilots of every level. {a} I hope this helps, and feel "
    "free to reach out again if anything else comes up while you are flying.",
    "Thanks so much for getting in touch with us today. When it comes to the {t}, it is worth knowing the "
    "details before your next flight, so here they are. {a} Please let me know if you have any other "
    "questions about your drone, its accessories or anything else at all.",
    "Happy to help with that! Many customers ask about the {t} before and after they buy, and it is a good "
    "thing to check. {a} If you would like more information, our website and user manual cover this topic "
    "in much more depth, and we are always here to help.",
]


def _pair_record(question: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def preference_questions(phrasings: int = 2) -> list[str]:
    """The training questions of the preference pairs: ``phrasings`` wordings of each fact's question."""
    return [p.format(t=t) for t, _, _ in FACTS for p in TRAIN_PHRASINGS[:phrasings]]


def build_preference(seed: int = 0, phrasings: int = 2, own: dict[str, str] | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """(training pairs in the conversational layout, held-out records): ``phrasings`` training questions per
    fact, and one held-out phrasing per fact (its record's last message is the preferred answer).

    ``own``: the model's own answers to the training questions (question -> answer). Where given, an answer
    that does not already follow the preference is the rejected one (on-policy pairs: what the model says now
    against what it should say); elsewhere a long friendly answer of the templates above."""
    rng = random.Random(seed)
    pairs = []
    for (t, _, a), q in zip([f for f in FACTS for _ in range(phrasings)], preference_questions(phrasings)):
        chosen, ramble = f"{a} {SIGN_OFF}", rng.choice(_RAMBLES).format(t=t, a=a)
        mine = (own or {}).get(q, "").strip()
        rejected = mine if mine and not follows_preference(mine) and mine != chosen else ramble
        pairs.append({"chosen": _pair_record(q, chosen), "rejected": _pair_record(q, rejected)})
    rng.shuffle(pairs)
    held = [{"messages": _pair_record(HELDOUT_PHRASINGS[0].format(t=t), f"{a} {SIGN_OFF}")} for t, _, a in FACTS]
    return pairs, held


def follows_preference(answer: str, max_words: int = 30) -> bool:
    """An answer follows the preference when it ends with the sign-off (nothing but punctuation after it)
    and is short (at most ``max_words`` words, sign-off included)."""
    text = answer.strip().rstrip(".! ")
    return bool(re.search(r"[—–-]\s*Nimbus Support$", text)) and len(text.split()) <= max_words


def write_preference(directory: str | Path, seed: int = 0, own: dict[str, str] | None = None
                     ) -> tuple[Path, list[dict]]:
    """Write the training pairs (pairs.jsonl) and held-out records (heldout.jsonl); (pairs file, held-out)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pairs, held = build_preference(seed, own=own)
    for name, rows in (("pairs.jsonl", pairs), ("heldout.jsonl", held)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl", held
