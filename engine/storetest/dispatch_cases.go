package storetest

func dispatchCases() []Case { return nil }
