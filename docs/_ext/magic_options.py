"""``.. magic-options::``: each ``%px``-family magic with its docstring and its options, as
``magic_arguments`` prints them (``%px?``): the reference cannot drift from the parser."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class MagicOptions(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        from IPython.core import magic_arguments

        from ipy_multiengine.magics import ParallelMagics

        out: list[nodes.Node] = []
        for kind, names in sorted(ParallelMagics.magics.items()):
            for name in sorted(names):
                fn = getattr(ParallelMagics, names[name])
                prefix = "%%" if kind == "cell" else "%"
                section = nodes.section(ids=[f"magic-{kind}-{name}"])
                section += nodes.title(text=f"{prefix}{name}")
                doc = (fn.__doc__ or "").split("\n\n")[0].strip()
                parser = getattr(fn, "parser", None)
                if parser is not None:
                    doc = parser.description or doc
                    usage = magic_arguments.construct_parser(fn).format_help()
                    section += nodes.paragraph(text=" ".join(doc.split()))
                    section += nodes.literal_block(text=usage.strip())
                else:
                    section += nodes.paragraph(text=" ".join(doc.split()) or "(no options)")
                out.append(section)
        return out


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("magic-options", MagicOptions)
    return {"parallel_read_safe": True}
