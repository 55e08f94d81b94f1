"""A client's data: its image folders and splits (``local``), and the published data sets' layouts (``datasets``)."""
