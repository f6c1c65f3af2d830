"""What each class means to the product: which class is "no lesion", which classes are lesions (and show the
lesion map), and which are critical (the recalls the INT8 gate protects). Roles belong to the model: a
native checkpoint records ours, a team's spec states its own, and the bundle manifest carries them
(`model.roles`), so no code compares a class name with "normal" or "hsil".
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_pfm.errors import EdgePfmError

# our four classes' roles; applied by name to models that did not state theirs (and to older bundles)
DEFAULT_ROLES = {"no_lesion": "normal", "lesion": ("lsil", "hsil"), "critical": ("hsil",)}


class RolesError(EdgePfmError, ValueError):
    """Class roles that do not fit the classes; the message names the key."""


@dataclass(frozen=True)
class ClassRoles:
    no_lesion: str | None  # the class whose tissue has no lesion (its lesion map should be empty)
    lesion: tuple[str, ...]  # lesion classes: the ones whose decisions show the lesion map
    critical: tuple[str, ...]  # classes whose recall the INT8 gate protects; () = every class

    @classmethod
    def default_for(cls, classes: tuple[str, ...] | list[str]) -> ClassRoles:
        """Our roles, kept for the classes this model has (a class we do not know gets no role)."""
        return cls(DEFAULT_ROLES["no_lesion"] if DEFAULT_ROLES["no_lesion"] in classes else None,
                   tuple(c for c in DEFAULT_ROLES["lesion"] if c in classes),
                   tuple(c for c in DEFAULT_ROLES["critical"] if c in classes))

    @classmethod
    def from_dict(cls, d: object, classes: tuple[str, ...] | list[str], where: str = "roles") -> ClassRoles:
        if not isinstance(d, dict):
            raise RolesError(f"{where} must be an object with no_lesion, lesion, critical; got {type(d).__name__}")
        unknown = sorted(set(d) - {"no_lesion", "lesion", "critical"})
        if unknown:
            raise RolesError(f"{where} has unknown keys {unknown}; it takes no_lesion, lesion, critical")
        no_lesion, lesion, critical = d.get("no_lesion"), d.get("lesion", []), d.get("critical", [])
        if no_lesion is not None and no_lesion not in classes:
            raise RolesError(f"{where}.no_lesion {no_lesion!r} is not one of the classes {list(classes)}")
        for key, names in (("lesion", lesion), ("critical", critical)):
            if not isinstance(names, list | tuple) or not all(isinstance(c, str) for c in names):
                raise RolesError(f"{where}.{key} must be a list of class names, got {names!r}")
            bad = [c for c in names if c not in classes]
            if bad:
                raise RolesError(f"{where}.{key} names {bad}, which are not among the classes {list(classes)}")
        if no_lesion is not None and no_lesion in lesion:
            raise RolesError(f"{where}: {no_lesion!r} cannot be both no_lesion and a lesion class")
        return cls(no_lesion, tuple(lesion), tuple(critical))

    def to_dict(self) -> dict:
        return {"no_lesion": self.no_lesion, "lesion": list(self.lesion), "critical": list(self.critical)}

    def protected(self, classes: tuple[str, ...]) -> tuple[str, ...]:
        """The recalls the INT8 gate protects: the critical classes, or every class when none is named."""
        return self.critical or tuple(classes)
