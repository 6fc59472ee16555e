"""Keep the rendered book offline: drop sphinx-thebe's scripts from every page.

Jupyter Book 1 always loads sphinx-thebe, which writes a CDN URL for thebe into every page
(fetched only by a "live code" button this book never shows). The book renders its published
notebooks and has no live kernel, so the scripts are dead weight that names a CDN.
"""


def _drop_thebe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return

    def is_thebe(js) -> bool:
        name = str(getattr(js, "filename", js) or "")
        body = str(getattr(js, "attributes", {}).get("body", ""))
        return "sphinx-thebe" in name or "THEBE_JS_URL" in body or "thebe@" in name

    context["script_files"] = [js for js in scripts if not is_thebe(js)]


def setup(app):
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
