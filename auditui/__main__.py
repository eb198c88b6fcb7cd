from auditui.cli import main

main()
