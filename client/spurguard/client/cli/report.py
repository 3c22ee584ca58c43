"""`spurguard report`: static HTML pages a person labels components from (SPEC section 3).

Why static HTML with inline CSS and relative PNG paths: a report is opened from disk, archived
beside a fit or mailed around, and must render offline, without a server, scripts or network
assets. Every number and image comes from one fit (the model's current one, pinned by id for
all calls), so a report is a consistent snapshot even if a new fit is committed meanwhile.
Per class: GetComponents for the top N components, Visualize for all of them at once (split
only above the server's per-request limit); ListLabels once for the index. The PNGs are written
by the `visualize` command's writer, in its layout, under the report folder:

    DIR/index.html                    the classes, with links and their label counts
    DIR/class_<K>.html                one row per component
    DIR/class_<K>/component_<L>/…     top_<rank>.png, heatmap_<rank>.png, attack.png

Only the standard library and the thin client are used: no torch, no PIL.
"""
from __future__ import annotations

import html
import shlex
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spurguard import vocab as t
from spurguard.client.cli.format import MISSING, alpha_statistics, fraction, number, transfer_line
from spurguard.client.cli.progress import visualize_line
from spurguard.client.cli.visualize import VisualizeWriter
from spurguard.client.client import Client, SpurguardClientError
from spurguard.vocab.display import heatmap_css_gradient

DEFAULT_TOP = 10
COMPONENTS_PER_CALL = 16  # the server's limit of components per Visualize request
LABEL_ORDER = ("spurious", "not_spurious", "inconsistent", "unlabeled")

# Progress: (text, key); a new key (the class) is always shown.
ReportProgress = Callable[[str, str], None]

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
.meta { color: #555; margin: 0 0 1em; }
table.components, table.classes { border-collapse: collapse; width: 100%; }
table.components > tbody > tr > td, table.classes td, th { border-top: 1px solid #ccc; padding: .5em; vertical-align: top; text-align: left; }
td.index { font-size: 1.6em; font-weight: bold; }
table.stats th, table.stats td { border: 0; padding: 0 .6em 0 0; font-weight: normal; white-space: nowrap; }
table.stats td { text-align: right; font-variant-numeric: tabular-nums; }
table.components { table-layout: fixed; min-width: 900px; }
col.index { width: 7em; } col.stats { width: 16em; } col.attack { width: 190px; } col.label { width: 15em; }
.images { display: flex; flex-wrap: wrap; gap: .5em; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { width: 88px; height: 88px; image-rendering: pixelated; display: block; background: #eee; }
figure .pair { display: flex; gap: 2px; }
figcaption .id { display: inline-block; max-width: 178px; overflow-wrap: anywhere; color: #666; }
.attack img { width: 168px; height: 168px; }
.badge { display: inline-block; padding: .1em .5em; border-radius: .8em; background: #ddd; }
.badge.spurious { background: #f4b6b6; } .badge.not_spurious { background: #bde5bd; }
.badge.inconsistent { background: #f1e0a6; }
.note { color: #444; font-style: italic; margin: .3em 0; }
pre { background: #f5f5f5; padding: .4em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; user-select: all; }
.legend { display: flex; align-items: center; gap: .5em; color: #555; margin: 0 0 1em; font-size: 12px; }
.legend .bar { display: inline-block; width: 160px; height: 12px; border: 1px solid #999; background: GRADIENT; }
""".replace("GRADIENT", heatmap_css_gradient())
# The overlays' colour scale: the server blends the colour over the image in proportion to heat.
_LEGEND = (
    '<p class="legend">heatmap colour: <span>low (the image shows through)</span>'
    '<span class="bar" role="img" aria-label="colour scale: dark purple, red, orange, yellow"></span>'
    "<span>high: where alpha comes from most (each image scaled to its own 95th percentile of heat)</span></p>\n"
)


def _e(value: object) -> str:
    """Text for HTML content and attribute values (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def class_name(info: t.ModelInfo, class_index: int) -> str:
    """The class's name from GetModel, or its index where the model has none for it."""
    return info.classes[class_index].name if class_index < len(info.classes) else str(class_index)


def label_command(model: str, class_index: int, component: int, server_option: str = "") -> str:
    """The shell command that labels a component spurious (quoted for a POSIX shell)."""
    return (
        f"spurguard {server_option}label --model {shlex.quote(model)} --class {class_index} "
        f"--component {component} --as spurious"
    )


_HEATMAP_NAMES = {
    "grad_cam": "Grad-CAM",
    "integrated_gradients": "integrated gradients from gray",
    "input_gradient": "input-gradient saliency",
}


def _heatmap_methods(shown: dict[int, dict[str, Any]], layer: str | None) -> str:
    """How the page's heatmaps were made, as the server reported it (it may fall back)."""
    methods = sorted({
        top["heatmap_method"] for entry in shown.values() for top in entry.get("top_images", []) if top["heatmap_method"]
    })
    named = [_HEATMAP_NAMES.get(m, m) + (f" on layer {layer}" if m == "grad_cam" and layer else "") for m in methods]
    return ", ".join(named) or "none"


class ReportWriter:
    """Writes one report folder: a page per class as it is finished, then the index."""

    def __init__(self, client: Client, info: t.ModelInfo, out: Path, *, server_option: str = "") -> None:
        """`info` is GetModel's answer (its fit is the one reported); `server_option` is put
        into the label commands ("--server H:P " when the server is not the default one)."""
        if info.fit_id is None:
            raise ValueError(f"model {info.name} has no fit to report")
        self.client = client
        self.info = info
        self.out = out
        self.server_option = server_option
        self.classes: list[dict[str, Any]] = []  # the --json entries, in order
        self._fitted: dict[int, int] = {}  # class -> components the fit keeps

    def _img(self, path: str, alt: str) -> str:
        """A PNG written under `out`, linked to itself (full size), by a URL relative to the pages."""
        src = _e(quote(Path(path).relative_to(self.out).as_posix()))
        return f'<a href="{src}"><img src="{src}" alt="{_e(alt)}"></a>'

    def add_class(
        self,
        class_index: int,
        *,
        top: int = DEFAULT_TOP,
        steps: int | None = None,
        eps: float | None = None,
        top_k: int | None = None,
        heatmap: str | None = None,
        heatmap_layer: str | None = None,
        parameterization: str | None = None,
        progress: ReportProgress | None = None,
    ) -> Path:
        """GetComponents and Visualize for the class's first `top` components; writes its page."""
        model, fit_id = self.info.name, self.info.fit_id
        components = self.client.get_components(model, class_index, top=top, fit_id=fit_id)
        writer = VisualizeWriter(self.out, class_index)
        indices = [c.index for c in components.components]
        for start in range(0, len(indices), COMPONENTS_PER_CALL):
            updates = self.client.visualize(
                model, class_index, indices[start : start + COMPONENTS_PER_CALL],
                steps=steps, eps=eps, top_k=top_k, frame_every=0, fit_id=fit_id,
                heatmap=heatmap, heatmap_layer=heatmap_layer, parameterization=parameterization,
            )
            for update in updates:
                writer.add(update)
                if progress is not None:
                    progress(f"report class {class_index}: {visualize_line(update)}", f"class {class_index}")
        shown = {entry["index"]: entry for entry in writer.summary(model)["components"]}
        self._fitted[class_index] = components.num_components
        page = self.out / f"class_{class_index}.html"
        page.write_text(self._class_page(components, shown, eps, heatmap_layer), encoding="utf-8")
        self.classes.append({
            "class": class_index,
            "page": str(page),
            "components": [{**shown.get(c.index, {"index": c.index}), "label": c.label, "note": c.note}
                           for c in components.components],
        })
        return page

    def finish(self) -> dict[str, Any]:
        """Writes index.html; returns the `report --json` document {index, classes}."""
        counts = Counter((r.class_index, r.label) for r in self.client.list_labels(self.info.name, fit_id=self.info.fit_id))
        index = self.out / "index.html"
        index.write_text(self._index_page(counts, self._transfer_note()), encoding="utf-8")
        return {"index": str(index), "classes": self.classes}

    # ---- HTML ----

    def _class_page(
        self, components: t.Components, shown: dict[int, dict[str, Any]], eps: float | None, layer: str | None
    ) -> str:
        k, model = components.class_index, self.info.name
        title = f"{model} — class {k}: {class_name(self.info, k)}"
        steps = next((entry["steps"] for entry in shown.values() if entry.get("steps") is not None), None)
        used = next((entry["eps"] for entry in shown.values() if entry.get("eps") is not None), None)
        radius = MISSING if used is None else number(used) + ("" if eps is not None else " (the server's default)")
        moved = next((e["parameterization"] for e in shown.values() if e.get("parameterization") is not None), MISSING)
        meta = (
            f"fit {components.fit_id} · {components.images} fit images · components 0–{len(components.components) - 1} "
            f"shown of {components.num_components} · floor = {number(components.floor_percentile)}th percentile of "
            f"alpha · feature attack from gray: {steps if steps is not None else '-'} steps, L2 radius {radius}, "
            f"parameterization {moved}"
            f" · heatmaps: {_heatmap_methods(shown, layer)}"
        )
        rows = "".join(self._component_row(k, c, shown.get(c.index, {})) for c in components.components)
        heatmaps = any(top.get("heatmap") for entry in shown.values() for top in entry.get("top_images", []))
        body = (
            '<p><a href="index.html">← all classes</a></p>\n'
            f"<h1>{_e(title)}</h1>\n<p class=\"meta\">{_e(meta)}</p>\n"
            f"{_LEGEND if heatmaps else ''}"
            '<table class="components">\n<colgroup><col class="index"><col class="stats"><col><col class="attack">'
            '<col class="label"></colgroup>\n<thead><tr><th>component</th><th>statistics</th>'
            "<th>top fit images (left) and where alpha comes from (right)</th><th>feature attack</th>"
            f"<th>label</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>\n"
        )
        return _page(title, body)

    def _component_row(self, class_index: int, component: t.Component, shown: dict[str, Any]) -> str:
        c = component
        stats = "".join(
            f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>"
            for name, value in (
                ("explained variance", f"{100 * c.explained_variance:.1f}%"),
                ("eigenvalue", number(c.eigenvalue)),
                *zip(("alpha mean", "alpha floor", "alpha max"), alpha_statistics(c)),
            )
        )
        figures = "".join(self._top_figure(top) for top in shown.get("top_images", []))
        attack = ""
        if shown.get("attack_image"):
            caption = (
                f"alpha {_e(number(shown['start_alpha']))} → {_e(number(shown['final_alpha']))}<br>"
                f"p(k|x) {_e(fraction(shown['final_prob']))}"
            )
            image = self._img(shown["attack_image"], f"feature attack on component {c.index}")
            attack = f'<figure class="attack">{image}<figcaption>{caption}</figcaption></figure>'
        note = f'<p class="note">{_e(c.note)}</p>' if c.note else ""
        command = label_command(self.info.name, class_index, c.index, self.server_option)
        return (
            f'<tr id="component-{c.index}">\n<td class="index">{c.index}</td>\n'
            f'<td><table class="stats">{stats}</table></td>\n'
            f'<td><div class="images">{figures or "no fit image could be read"}</div></td>\n'
            f"<td>{attack}</td>\n"
            f'<td><span class="badge {_e(c.label)}">{_e(c.label)}</span>{note}'
            f"<pre><code>{_e(command)}</code></pre>"
            "<small>or --as not_spurious / inconsistent / unlabeled</small></td>\n</tr>\n"
        )

    def _top_figure(self, top: dict[str, Any]) -> str:
        images = "".join(
            self._img(top[key], f"{what} {top['image_id']}")
            for key, what in (("png", "fit image"), ("heatmap", "heatmap of"))
            if top.get(key)
        )
        return (
            f'<figure><div class="pair">{images}</div><figcaption>alpha {_e(number(top["alpha"]))}<br>'
            f'<span class="id" title="{_e(top["image"])}">{_e(top["image_id"])}</span></figcaption></figure>'
        )

    def _transfer_note(self) -> str:
        """The transfer the model applies, and whether the source's labels have moved on since
        (they change nothing here until the next transfer); "" without a transfer."""
        transfer = self.info.transfer
        if transfer is None:
            return ""
        note = transfer_line(self.info.name, transfer) + ". Scores and SpuFix apply these directions besides the own labels."
        carried = {(r.class_index, r.component) for r in transfer.labels}
        try:
            fit_id = self.client.get_model(transfer.source_model).fit_id
            now = {(r.class_index, r.component) for r in self.client.list_labels(transfer.source_model, label="spurious")
                   if r.class_index in transfer.classes} if fit_id else set()
        except SpurguardClientError as error:
            return f"{note} (source not readable now: {error.code.name})"
        if (fit_id, now) != (transfer.source_fit, carried):
            note += (f" The source's fit or spurious labels have changed since (fit {fit_id}); run `spurguard transfer "
                     f"--from {transfer.source_model} --to {self.info.name}` to apply them.")
        return note

    def _index_page(self, counts: Counter[tuple[int, str]], transfer_note: str = "") -> str:
        info = self.info
        rows = []
        for entry in self.classes:
            k = entry["class"]
            fitted = self._fitted[k]
            labelled = {label: counts[(k, label)] for label in LABEL_ORDER[:-1]}
            cells = [
                f'<a href="{_e(quote(Path(entry["page"]).name))}">class {k}: {_e(class_name(info, k))}</a>',
                str(len(entry["components"])),
                str(fitted),
                *(str(n) for n in labelled.values()),
                str(fitted - sum(labelled.values())),
            ]
            rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>\n")
        headers = ["class", "shown", "components", *(label.replace("_", " ") for label in LABEL_ORDER)]
        title = f"{info.name} — spurious feature report"
        body = (
            f"<h1>{_e(title)}</h1>\n<p class=\"meta\">{_e(f'fit {info.fit_id} · {len(self.classes)} classes')}</p>\n"
            + (f'<p class="transfer">{_e(transfer_note)}</p>\n' if transfer_note else "")
            + '<table class="classes">\n<thead><tr>'
            + "".join(f"<th>{_e(h)}</th>" for h in headers)
            + f"</tr></thead>\n<tbody>\n{''.join(rows)}</tbody>\n</table>\n"
        )
        return _page(title, body)


def write_report(
    client: Client,
    info: t.ModelInfo,
    out: Path,
    classes: Sequence[int],
    *,
    top: int = DEFAULT_TOP,
    steps: int | None = None,
    eps: float | None = None,
    top_k: int | None = None,
    heatmap: str | None = None,
    heatmap_layer: str | None = None,
    parameterization: str | None = None,
    server_option: str = "",
    progress: ReportProgress | None = None,
) -> dict[str, Any]:
    """The whole report for `classes` of the model `info` describes; returns the `--json` document."""
    out.mkdir(parents=True, exist_ok=True)
    report = ReportWriter(client, info, out, server_option=server_option)
    for class_index in classes:
        report.add_class(
            class_index, top=top, steps=steps, eps=eps, top_k=top_k, heatmap=heatmap, heatmap_layer=heatmap_layer,
            parameterization=parameterization, progress=progress,
        )
    return report.finish()
