"""Which public docstrings do not follow the API reference's convention (Google style, as transformers' models write
them: a summary, then `Args:` / `Returns:` / `Raises:` sections). Not a test: a report for whoever edits them.

    python tests/docs/docstring_report.py

Lists, for every name of `viscpm_hf.__all__` and the public methods its class defines: what griffe cannot parse
(the warnings mkdocs.yml silences with `warnings: false`), and methods that take arguments but have no `Args:`.
"""

import logging
from pathlib import Path

import griffe


REPOSITORY = Path(__file__).resolve().parents[2]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def documented_objects(package):
    for name in package.exports or []:
        obj = package[name]
        obj = obj.final_target if obj.is_alias else obj
        yield obj
        if obj.is_class:
            for member in obj.members.values():
                if (
                    not member.is_alias
                    and member.is_function
                    and (not member.name.startswith("_") or member.name == "__call__")
                ):
                    yield member


def main() -> None:
    collect = Collect()
    logging.getLogger("griffe").addHandler(collect)
    package = griffe.load("viscpm_hf", search_paths=[str(REPOSITORY / "src")], docstring_parser="google")
    missing_args = []
    for obj in documented_objects(package):
        if obj.docstring is None:
            continue
        sections = obj.docstring.parse("google")
        kinds = {section.kind.value for section in sections}
        if obj.is_function:
            parameters = [p for p in obj.parameters if p.name not in ("self", "cls") and not p.name.startswith("*")]
            if parameters and "parameters" not in kinds:
                missing_args.append(f"{obj.relative_filepath}:{obj.lineno} {obj.path}: no Args for "
                                    f"{', '.join(p.name for p in parameters)}")  # fmt: skip
    print("Unparsable entries (griffe):")
    print("\n".join(f"  {message}" for message in sorted(set(collect.messages))) or "  none")
    print("Methods and functions with arguments but no Args section:")
    print("\n".join(f"  {line}" for line in missing_args) or "  none")


if __name__ == "__main__":
    main()
