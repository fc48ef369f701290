package broker

// Connections lists the devices connected to this broker now (one entry
// per device: its newest session), for a cluster-wide connection view.
func (b *Broker) Connections() []ConnInfo {
	b.mu.RLock()
	defer b.mu.RUnlock()
	out := make([]ConnInfo, 0, len(b.devices))
	for _, conns := range b.devices {
		var best ConnInfo
		found := false
		for _, tc := range conns {
			if info, ok := tc.info(); ok && (!found || info.ConnectedSince.After(best.ConnectedSince)) {
				best, found = info, true
			}
		}
		if found {
			out = append(out, best)
		}
	}
	return out
}
