"""The export's remote code: the files `auto_map` names, and the modules they import relatively.

vLLM loads Skywork-R1V with --trust-remote-code from these files, so an export must carry them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from r1v_quant.deploy.checks import Check, listing

_REL_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][\w.]*)?\s+import\s+([\w ,()]+)", re.MULTILINE)


def check_remote_code(folder: Path, raw: dict[str, Any]) -> Check:
    name = "remote code (auto_map)"
    auto_map = raw.get("auto_map")
    if not auto_map:
        return Check(name, "fail", "config.json has no auto_map; vLLM loads this model type with --trust-remote-code "
                                   "from the Python files auto_map names, so copy the source checkpoint's.")
    refs: list[str] = []
    for value in (auto_map.values() if isinstance(auto_map, dict) else []):
        refs.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    if not refs:
        return Check(name, "fail", "auto_map is not a mapping of class references.")
    missing, elsewhere, files = [], [], []
    for ref in refs:
        repo, _, local = ref.rpartition("--")
        module = local.rsplit(".", 1)[0]
        file = module.replace(".", "/") + ".py"
        if file not in files:
            files.append(file)
        if not (folder / file).is_file():
            (elsewhere if repo else missing).append(f"{file}" + (f" (from {repo})" if repo else ""))
    seen, queue = set(), [f for f in files if (folder / f).is_file()]
    while queue:
        f = queue.pop()
        if f in seen:
            continue
        seen.add(f)
        text = (folder / f).read_text(errors="replace")
        for mod, names in _REL_IMPORT.findall(text):
            candidates = [mod.replace(".", "/") + ".py"] if mod else [n.strip() + ".py" for n in names.strip("() ").split(",")]
            for c in candidates:
                if (folder / c).is_file():
                    queue.append(c)
                elif mod:
                    missing.append(f"{c} (imported by {f})")
    problems = []
    if missing:
        problems.append(f"missing {listing(sorted(set(missing)))}")
    if elsewhere:
        problems.append(f"auto_map points at another repository's code, absent here: {listing(sorted(set(elsewhere)))}")
    if problems:
        return Check(name, "fail", "remote-code files for --trust-remote-code: " + "; ".join(problems) + ".")
    return Check(name, "pass", f"{', '.join(sorted(seen))} present.")
