"""Deployment on separate machines: TLS material and SuperNode keys (``certs``), the launch commands of
each role with the project's defaults (``launch``), and a federation of real network namespaces on one
machine (``netns``) that tests and documents all of it."""
