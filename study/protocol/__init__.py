"""The protocol layer: the typed schema (`schema`), its expansion into cells (`plan`) and lesson files (`lesson`).
"""
