from nfctl.cli.main import app

app()
