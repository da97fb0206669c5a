"""The kubectl plugin: ``kubectl keyroom sign|approve|deny|get|status``."""
