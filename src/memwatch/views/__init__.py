"""Views over the store: the tables and charts (``memwatch curves``), the memorization chart, the audit report, and
onset planning from pilot runs."""
