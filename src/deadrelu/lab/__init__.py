"""The evidence lab: the demo, experiments, their MLP training harness, datasets, plots and HTML report.

Built on the public library (scan, Monitor, surgery); nothing in the library imports the lab.
"""
