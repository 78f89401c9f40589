package storetest

func runCases() []Case { return nil }
