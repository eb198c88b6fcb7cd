"""The Textual face of auditui: screens over engine calls run in workers."""
