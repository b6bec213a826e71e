"""The draft report as a PDF (fpdf2: pure Python, no system libraries), from the same report dict the HTML page
and `trainwatch report` use, with the compute plot. Text is set in DejaVu Sans, which matplotlib ships, so
Unicode (dashes, names in any script) prints without a system font."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
from fpdf import FPDF

from pipeline.cases.report import render_markdown

_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _pdf() -> FPDF:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_font("DejaVu", "", str(_FONTS / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(_FONTS / "DejaVuSans-Bold.ttf"))
    pdf.set_font("DejaVu", size=9)
    pdf.set_title("DRAFT report")
    pdf.set_creator("trainwatch")
    pdf.add_page()
    return pdf


def render_pdf(report: dict[str, Any], plot_png: bytes | None) -> bytes:
    """The report's Markdown, laid out line by line (headings bold), with the plot after the compute section."""
    pdf = _pdf()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    for line in render_markdown(report).splitlines():
        text = line.replace("**", "").replace("`", "").replace("_not on file_", "not on file")
        if text.startswith("#"):
            level = len(text) - len(text.lstrip("#"))
            pdf.set_font("DejaVu", "B", 14 if level == 1 else 11)
            pdf.multi_cell(width, 6, text.lstrip("# "), new_x="LMARGIN", new_y="NEXT")
            pdf.set_font("DejaVu", "", 9)
            if text.lstrip("# ") == "Evidence" and plot_png:
                pdf.image(io.BytesIO(plot_png), w=width)
            continue
        if text.startswith(">"):
            pdf.set_font("DejaVu", "B", 9)
            pdf.set_text_color(165, 15, 21)
            pdf.multi_cell(width, 5, text.lstrip("> "), new_x="LMARGIN", new_y="NEXT")
            pdf.set_text_color(0, 0, 0)
            pdf.set_font("DejaVu", "", 9)
            continue
        if not text.strip():
            pdf.ln(2)
            continue
        # Wrapped at spaces (fpdf2 breaks a single token wider than the line by character).
        pdf.multi_cell(width, 4.5, text, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
