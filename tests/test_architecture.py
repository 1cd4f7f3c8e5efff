"""The shape of the code, read from the source (AST) of every module of pipeline/, jobs/, serve/ and pidray/: no import
circle, no arrow back up the layers, no module over 450 lines.

The import graph: one node per module file (a package's `__init__.py` is the node of the package's own name), one
edge per import statement that names a module of these packages, at module level or inside a function or class
alike (an import inside a function is a circle all the same, only later). `import a.b` and `from a.b import c` give
an edge to `a.b`, or to `a.b.c` when `c` is a submodule; the implicit import of a parent package's `__init__.py` that
Python makes first is not an edge (otherwise a package whose `__init__.py` re-exports its modules would be in a circle
with each of them), but an import of a name from the package itself (`from pipeline.storage import Location` inside
pipeline/storage/) is an edge to its `__init__.py`, as it should be.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "jobs", "serve", "pidray")
MAX_LINES = 450

# The layers, top to bottom: a module may import its own layer and those below it, never one above. Modules in none
# of these (storage, latents, errors, imageio, tiling, ...) are helpers below the stages: they import no stage,
# workflow, graph or front end.
LAYERS = [("pidray", 8), ("pipeline.doctor", 8), ("jobs", 7), ("serve", 7), ("pipeline.graph", 6),
          ("pipeline.workflow", 5), ("pipeline.stages", 4), ("pipeline.runtime", 3), ("pipeline.encoders", 2),
          ("pipeline.model", 1), ("pipeline.kernels", 0)]  # fmt: skip
HELPER_CEILING = 3  # the highest layer a helper module may import (pipeline.runtime)
# Known arrows up, each with its reason; the test fails when one disappears too, so this list stays true.
UPWARD = {
    # the kernel's benchmark/test cases build a RoPE table with the model's own function (inside a function)
    ("pipeline.kernels.qk_norm_rope", "pipeline.model.math"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package (a package's own, for an __init__)
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        deps.add(sub)
                    elif target in modules:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int | None:
    return next((rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")), None)


def test_the_graph_sees_in_function_imports_and_packages():
    """The graph itself: an import inside a function is an edge; a package's __init__ re-exporting is its own node."""
    graph = _graph()
    assert "pipeline.model.t2i_sampler" in graph["pipeline.t2i"]  # module level
    assert "pipeline.storage" in graph and "pipeline.storage.local" in graph["pipeline.storage"]  # re-exports
    assert "pipeline.storage" in graph["jobs.settings"]  # `from pipeline.storage import Location` inside a function
    assert "pipeline.storage.base" in graph["pipeline.storage.local"]


def test_no_import_circle_anywhere():
    """No two modules import each other, directly or through others, counting imports inside functions."""
    cycles = _cycles(_graph())
    assert not cycles, cycles


def test_no_arrow_back_up_the_layers():
    """pidray -> jobs/serve -> graph -> workflow -> stages -> runtime -> encoders -> model -> kernels: nothing imports
    a layer above its own; a helper module imports nothing above the runtime."""
    found = set()
    for module, deps in _graph().items():
        mine = _layer(module)
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and theirs > (HELPER_CEILING if mine is None else mine):
                found.add((module, dep))
    assert found - UPWARD == set(), sorted(found - UPWARD)
    assert UPWARD <= found, f"no longer imported upward (remove from UPWARD): {sorted(UPWARD - found)}"


def test_no_module_over_450_lines():
    """A module that grows past MAX_LINES is split by concern (storage: base/local/s3; latents: values/containers/
    file/preset), not let grow."""
    over = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not over, over


def test_no_module_compares_a_preset_sampler_by_name():
    """How a preset samples is an object (`Preset.sampling`): outside its module and the presets' table, no code
    compares a sampler's name."""
    names = {"distilled", "guided"}
    own = {"pipeline/model/sampling.py", "pipeline/model/presets.py"}
    hits = []
    for name, path in _modules().items():
        rel = str(path.relative_to(ROOT))
        if rel in own:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = {o.value for o in operands if isinstance(o, ast.Constant)}
                consts |= {e.value for o in operands if isinstance(o, (ast.Tuple, ast.Set, ast.List))
                           for e in o.elts if isinstance(e, ast.Constant)}  # fmt: skip
                if consts & names:
                    hits.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not hits, hits


TAG_FIELDS = {"vae", "task", "text_encoder", "sampler", "latent_noise"}  # a preset's words for what it is
TAG_OWNERS = {"pipeline/families.py", "pipeline/model/presets.py"}  # the registry, and the properties that read them


def _tag_comparisons(source: str, where: str = "<source>") -> list[str]:
    """Comparisons of a tag field (`x.vae`, `x.task`, ... of anything) with a word or a tuple/set/list of words."""

    def words(node) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        return isinstance(node, (ast.Tuple, ast.Set, ast.List)) and any(words(e) for e in node.elts)

    hits = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            tags = [o for o in operands if isinstance(o, ast.Attribute) and o.attr in TAG_FIELDS]
            if tags and any(words(o) for o in operands):
                hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_the_tag_check_sees_a_word_compared():
    """The check below fails on the comparisons it exists to keep out, and passes the object-based forms."""
    bad = ['preset.vae == "rgb"', 'self.preset.vae != "rgb"', 'p.task in ("upscale", "t2i")',
           'cfg.flow.preset.text_encoder == "none"', '"guided" == preset.sampler', 'p.latent_noise != "vp"',
           'x.vae not in {"dinov2", "siglip"}', 'a < p.task == "t2i"']  # fmt: skip
    for src in bad:
        assert _tag_comparisons(src), src
    good = ["preset.family.pixels", "preset.vae == other.vae", "fam.name != preset.vae", "p.upscales",
            "preset.sampler not in SAMPLINGS", "preset.noise.variance_preserving", 'p.name == "rgb"']  # fmt: skip
    for src in good:
        assert not _tag_comparisons(src), src


def test_no_module_compares_a_preset_tag_with_a_word():
    """What a preset is comes as objects: its VAE family record (`preset.family`, `pipeline/families.py`), its noise
    frame, its sampling, and properties for its task and captioner (`upscales`, `generates_images`, `captioned`).
    Outside the registry and the preset's own properties, no module compares `.vae`, `.task`, `.text_encoder`,
    `.sampler` or `.latent_noise` with a word, so a new family or sampler is one record, not a hunt for sites."""
    hits = []
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        if rel not in TAG_OWNERS:
            hits += _tag_comparisons(path.read_text(), rel)
    assert not hits, hits


BROAD = {"Exception", "BaseException"}


def _unsaid_broad_catches(source: str, where: str = "<source>") -> list[tuple[str, str, int]]:
    """(where, the enclosing function's qualified name, line) of each `except:`, `except Exception` or `except
    BaseException` (alone or in a tuple) whose `except` line carries no comment."""
    import io
    import tokenize

    lines = tokenize.generate_tokens(io.StringIO(source).readline)
    commented = {t.start[0] for t in lines if t.type == tokenize.COMMENT}

    def broad(node) -> bool:
        names = node.elts if isinstance(node, ast.Tuple) else [node]
        return any(isinstance(n, ast.Name) and n.id in BROAD for n in names)

    hits = []

    def visit(node, scope: tuple[str, ...]):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ExceptHandler) and (child.type is None or broad(child.type)):
                if child.lineno not in commented:
                    hits.append((where, ".".join(scope) or "<module>", child.lineno))
            named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, (*scope, child.name) if named else scope)

    visit(ast.parse(source, where), ())
    return hits


def test_the_broad_catch_check_sees_one_unsaid():
    """The check below finds a broad catch with nothing said on its line (a `#` in a string is not a comment), and
    passes a narrowed one and a broad one that says what it isolates."""
    bad = ["try:\n    f()\nexcept Exception:\n    pass", "try:\n    f()\nexcept:\n    pass",
           "try:\n    f()\nexcept (ValueError, BaseException) as e:\n    raise",
           "def g():\n    try:\n        f()\n    except Exception: log('# not a comment')",
           "try:\n    f()\nexcept* Exception:\n    pass",
           "try:\n    f()\nexcept Exception:\n    pass  # said on the wrong line"]  # fmt: skip
    for src in bad:
        assert _unsaid_broad_catches(src), src
    assert _unsaid_broad_catches(bad[3], "m.py") == [("m.py", "g", 4)]
    good = ["try:\n    f()\nexcept (OSError, ValueError):\n    pass",
            "try:\n    f()\nexcept storage_failures():\n    pass",
            "try:\n    f()\nexcept Exception:  # one row's failure: the others go on\n    pass",
            "try:\n    f()\nexcept BaseException:  # an interrupt included: the temporary goes\n    raise"]  # fmt: skip
    for src in good:
        assert not _unsaid_broad_catches(src), src


def test_every_broad_catch_says_what_it_isolates():
    """A broad catch hides bugs unless it is a boundary on purpose: one item's failure (an image, a sample, a
    request, a step of the doctor), a hostile file a third-party reader raises anything on, cleanup on the way out.
    Every `except Exception`, `except BaseException` and bare `except:` in pipeline/, jobs/, serve/ and pidray/ says
    on its line what it isolates; a catch that can name its types (OSError, pipeline.errors.storage_failures(), a
    library's error base) names them instead."""
    found = set()
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        found |= {(where, scope) for where, scope, _ in _unsaid_broad_catches(path.read_text(), rel)}
    assert found == set(), sorted(found)
