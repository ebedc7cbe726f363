"""Imported by Python at start-up when this folder is on PYTHONPATH (the tests' child processes only): installs
the fault injection of molora_faults."""
import molora_faults

molora_faults.install_on_import()
