package fleet

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestRolloutPolicy_Normalize: a policy is stored in one spelling with its
// defaults, and every mistake is refused naming the field.
func TestRolloutPolicy_Normalize(t *testing.T) {
	for _, tc := range []struct {
		name      string
		in        RolloutPolicy
		wantWaves []string
		wantField string
		wantMsg   string
	}{
		{name: "defaults", in: RolloutPolicy{Waves: []string{"1%", "10%", "50%", "100%"}}, wantWaves: []string{"1%", "10%", "50%", "100%"}},
		{name: "a last 100% wave is added", in: RolloutPolicy{Waves: []string{"5%", "25%"}}, wantWaves: []string{"5%", "25%", "100%"}},
		{name: "counts then percentages", in: RolloutPolicy{Waves: []string{"5", " 50", "100%"}}, wantWaves: []string{"5", "50", "100%"}},
		{name: "a canary alone", in: RolloutPolicy{Canary: "tags.ring='canary'"}, wantWaves: []string{"100%"}},
		{name: "percentages must increase", in: RolloutPolicy{Waves: []string{"10%", "5%"}}, wantField: "rollout.waves[1]", wantMsg: "must increase"},
		{name: "equal waves do not increase", in: RolloutPolicy{Waves: []string{"10%", "10%"}}, wantField: "rollout.waves[1]", wantMsg: "must increase"},
		{name: "counts must increase", in: RolloutPolicy{Waves: []string{"50", "5"}}, wantField: "rollout.waves[1]", wantMsg: "must increase"},
		{name: "beyond 100%", in: RolloutPolicy{Waves: []string{"50%", "150%"}}, wantField: "rollout.waves[1]", wantMsg: "between 0% and 100%"},
		{name: "a count after a percentage", in: RolloutPolicy{Waves: []string{"10%", "50"}}, wantField: "rollout.waves[1]", wantMsg: "counts come before"},
		{name: "zero", in: RolloutPolicy{Waves: []string{"0%"}}, wantField: "rollout.waves[0]", wantMsg: "some devices"},
		{name: "not a number", in: RolloutPolicy{Waves: []string{"half"}}, wantField: "rollout.waves[0]", wantMsg: "percentage"},
		{name: "success above 100%", in: RolloutPolicy{WaveSuccess: "120%"}, wantField: "rollout.waveSuccess", wantMsg: "between 0% and 100%"},
		{name: "failures below 0%", in: RolloutPolicy{MaxFailures: "-5%"}, wantField: "rollout.maxFailures", wantMsg: "between 0% and 100%"},
		{name: "a soak that is no duration", in: RolloutPolicy{WaveSoak: "soon"}, wantField: "rollout.waveSoak", wantMsg: "duration"},
		{name: "a zero timeout", in: RolloutPolicy{WaveTimeout: "0s"}, wantField: "rollout.waveTimeout", wantMsg: "positive"},
		{name: "an unknown action", in: RolloutPolicy{OnFailure: "panic"}, wantField: "rollout.onFailure", wantMsg: "pause or rollback"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.in.Normalize()
			if tc.wantField != "" {
				var ve *ValidationError
				if !errors.As(err, &ve) || ve.Field != tc.wantField || !strings.Contains(ve.Msg, tc.wantMsg) {
					t.Fatalf("err %v, want a ValidationError on %s saying %q", err, tc.wantField, tc.wantMsg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Waves, tc.wantWaves) {
				t.Fatalf("waves %v, want %v", got.Waves, tc.wantWaves)
			}
			if tc.in.WaveSoak == "" && (got.WaveSoak != "30s" || got.WaveSuccess != "95%" || got.WaveTimeout != "5m0s" || got.MaxFailures != "10%" || got.OnFailure != OnFailurePause) {
				t.Fatalf("defaults not filled in: %+v", got)
			}
			again, err := got.Normalize()
			if err != nil || !slices.Equal(again.Waves, got.Waves) || again.WaveSoak != got.WaveSoak {
				t.Fatalf("normalizing twice changed it: %+v, %v", again, err)
			}
		})
	}
}

// TestWaveSpec_Size: a wave reaches at least one device of a non-empty
// set, never fewer than the wave before, never more than there are.
func TestWaveSpec_Size(t *testing.T) {
	for _, tc := range []struct {
		w           WaveSpec
		total, prev int
		want        int
	}{
		{WaveSpec{Percent: 5}, 1000, 0, 50},
		{WaveSpec{Percent: 1}, 10, 0, 1},
		{WaveSpec{Percent: 25}, 1000, 50, 250},
		{WaveSpec{Percent: 10}, 1000, 300, 300},
		{WaveSpec{Count: 20}, 10, 0, 10},
		{WaveSpec{Percent: 100}, 0, 0, 0},
	} {
		if got := tc.w.Size(tc.total, tc.prev); got != tc.want {
			t.Errorf("%s of %d after %d: %d, want %d", tc.w.Label(), tc.total, tc.prev, got, tc.want)
		}
	}
}

// TestWavePosition is fixed by the two ids alone.
func TestWavePosition(t *testing.T) {
	if WavePosition("d", "x") != WavePosition("d", "x") || WavePosition("d", "x") == WavePosition("e", "x") || WavePosition("d", "x") == WavePosition("d", "y") {
		t.Fatal("a position must depend on both ids and nothing else")
	}
	// The ids are separated: ("ab", "c") and ("a", "bc") differ.
	if WavePosition("ab", "c") == WavePosition("a", "bc") {
		t.Fatal("ids run together")
	}
}
