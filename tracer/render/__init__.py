"""Rendering a report document: terminal tables, the HTML page, the Model Explorer overlay. No torch."""
