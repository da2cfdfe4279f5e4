"""router: decides where each chat request runs and hands it over.

In this slice every request goes to a local-inference worker of the requested model (on this site, or
on the hub when the site has none). Policy (local vs cloud, fallbacks, A/B, masking) builds on this.
"""
