"""Helpers for the local lm-eval tasks in this folder."""


def wikitext_paragraphs(dataset):
    """WikiText-2's text file, one line per row, as paragraphs: drop blank lines and ' = Heading = ' lines."""

    def is_paragraph(row):
        line = row["text"].strip()
        return bool(line) and not (line.startswith("=") and line.endswith("="))

    return dataset.filter(is_paragraph).map(lambda row: {"text": row["text"].strip()})
