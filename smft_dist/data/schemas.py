"""Canonical record schemas and the error every data problem raises.

* ``text``: {text}
* ``facts``: {fact, paraphrases, question, answer}
* ``documents``: {document, augmentations}
* ``qa``: {question, answers}
* ``choice``: {context, endings, label}
* ``lm_pair``: {prompt, target} (only ``target`` is scored)
"""

from __future__ import annotations

FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "facts": ("fact", "paraphrases", "question", "answer"),
    "documents": ("document", "augmentations"),
    "qa": ("question", "answers"),
    "choice": ("context", "endings", "label"),
    "lm_pair": ("prompt", "target"),
}


class DataError(ValueError):
    """A data file or dataset is malformed; the message names the file (and line) at fault."""
