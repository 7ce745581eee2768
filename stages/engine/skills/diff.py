"""Item-level diff of two banks (``sgsd skills diff``).
"""

from __future__ import annotations

from typing import Any
from stages.engine.skills.bank import KINDS, SkillBank, item_label




def _norm(v: Any) -> str:
    return " ".join(str(v if v is not None else "").split())


def _content(kind: str, item: dict) -> tuple:
    return tuple(_norm(item.get(f)) for f in KINDS[kind][1][1:])


def diff_banks(old: SkillBank, new: SkillBank) -> list[dict]:
    """Per item: status added / removed / changed (same id, other text) / renamed (same text, other id).

    Unchanged items are left out.
    """
    out = []
    for kind, (_, fields) in KINDS.items():
        idf = fields[0]
        o_items, n_items = old.items(kind), new.items(kind)
        o_by_content = {}
        for it in o_items:
            o_by_content.setdefault(_content(kind, it), it)
        matched_old: set[str] = set()
        pending = []
        for it in n_items:
            c = _content(kind, it)
            if c in o_by_content and o_by_content[c][idf] not in matched_old:
                o = o_by_content[c]
                matched_old.add(o[idf])
                if o[idf] != it[idf]:
                    out.append({"kind": kind, "status": "renamed", "old_id": o[idf], "new_id": it[idf],
                                "label": item_label(kind, it), "fields": []})
            else:
                pending.append(it)
        o_rest = {it[idf]: it for it in o_items if it[idf] not in matched_old}
        for it in pending:
            o = o_rest.pop(it[idf], None)
            if o is not None:
                changed = [f for f in fields[1:] if _norm(o.get(f)) != _norm(it.get(f))]
                out.append({"kind": kind, "status": "changed", "old_id": o[idf], "new_id": it[idf],
                            "label": item_label(kind, it), "old_label": item_label(kind, o), "fields": changed})
            else:
                out.append({"kind": kind, "status": "added", "old_id": None, "new_id": it[idf],
                            "label": item_label(kind, it), "fields": []})
        for o in o_rest.values():
            out.append({"kind": kind, "status": "removed", "old_id": o[idf], "new_id": None,
                        "label": item_label(kind, o), "fields": []})
    return out
