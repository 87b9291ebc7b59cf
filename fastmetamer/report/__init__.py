"""Reports of metamer results: PNG figures, Markdown tables and a report folder.

>>> from fastmetamer.report import plot_loss_curves, summary_rows, markdown_table
>>> plot_loss_curves({"features": res}, "loss.png")
>>> print(markdown_table(summary_rows(res), SUMMARY_COLUMNS))
"""
from .figures import plot_features, plot_loss_curves, plot_neighbourhood, result_figures
from .markdown import markdown_table, write_report
from .summary import SUMMARY_COLUMNS, summary_rows

__all__ = ["SUMMARY_COLUMNS", "markdown_table", "plot_features", "plot_loss_curves",
           "plot_neighbourhood", "result_figures", "summary_rows", "write_report"]
