//! Feature functions: pure, event-time driven, unit tested.
//!
//! Every time feature is computed from the event's own timestamp, never from
//! the wall clock, so a replay gives the same values.

pub const SECONDS_PER_DAY: f64 = 86_400.0;

/// Days between the listing's first event and this event.
pub fn days_on_market(first_seen: i64, event_time: i64) -> f64 {
    ((event_time - first_seen) as f64 / SECONDS_PER_DAY).max(0.0)
}

/// Days since the last price change, or since the first event when the price never changed.
pub fn days_since_price_change(
    first_seen: i64,
    last_price_change: Option<i64>,
    event_time: i64,
) -> f64 {
    days_on_market(last_price_change.unwrap_or(first_seen), event_time)
}

/// Total drop from the first asking price, in percent (negative for a rise).
pub fn price_drop_percent(initial_price: Option<f64>, current_price: Option<f64>) -> Option<f64> {
    match (initial_price, current_price) {
        (Some(initial), Some(current)) if initial > 0.0 => {
            Some((initial - current) / initial * 100.0)
        }
        _ => None,
    }
}

/// Whole years from a calendar year to the event's year (UTC), at least zero.
pub fn years_since(year: Option<f64>, event_time: i64) -> Option<f64> {
    let year = year?;
    Some((civil_year(event_time) as f64 - year).max(0.0))
}

/// `numerator / max(denominator, floor)`; no value when either is missing or the
/// denominator is zero without a floor.
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>, floor: Option<f64>) -> Option<f64> {
    let numerator = numerator?;
    let mut denominator = denominator?;
    if let Some(floor) = floor {
        denominator = denominator.max(floor);
    }
    if denominator == 0.0 {
        return None;
    }
    Some(numerator / denominator)
}

/// The proleptic Gregorian year of a Unix timestamp (Howard Hinnant's civil_from_days).
pub fn civil_year(unix_seconds: i64) -> i64 {
    let days = unix_seconds.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    year_of_era + era * 400 + if month <= 2 { 1 } else { 0 }
}

/// `f64::round` (half away from zero, the sign of zero kept), bit for bit,
/// without a call: on the baseline x86-64 target Rust has no rounding
/// instruction and `round` is a libm call, about 25 instructions and a jump
/// per value, some nine times per document.
#[inline]
#[expect(
    clippy::neg_cmp_op_on_partial_ord,
    reason = "NaN must take the early return too (`x.abs() < 2^52` is false for NaN)"
)]
pub fn round(x: f64) -> f64 {
    // every f64 of magnitude 2^52 or more is whole already; NaN and the
    // infinities come back as libm returns them (`x + x`: a NaN quieted)
    if !(x.abs() < 4_503_599_627_370_496.0) {
        return if x.is_finite() { x } else { x + x };
    }
    let whole = x as i64; // truncates, exactly in this range
    let fraction = x - whole as f64; // exact: the bits of x below its units
    let rounded = if fraction >= 0.5 {
        whole + 1
    } else if fraction <= -0.5 {
        whole - 1
    } else {
        whole
    };
    (rounded as f64).copysign(x)
}

/// The value as an i64 when it is whole and below 9e15 in magnitude (how
/// documents print numbers as integers); `v.fract() == 0.0` is a libm call
/// on the baseline x86-64 target.
#[inline]
pub fn as_whole(v: f64) -> Option<i64> {
    if v.abs() < 9e15 {
        let whole = v as i64;
        if whole as f64 == v {
            return Some(whole);
        }
    }
    None
}

/// Which band a value falls in: the index of the first step whose threshold
/// exceeds it, `steps.len()` for `otherwise`. (Shaping keeps each band's
/// labels quoted by this index; market signatures hash their label hashes.)
pub fn band_index(value: f64, steps: &[(f64, String)]) -> usize {
    steps
        .iter()
        .position(|(below, _)| value < *below)
        .unwrap_or(steps.len())
}

/// Rounding to a multiple of a step, printing cleanly (0.1 steps give 12.3,
/// not 12.300000000000001). Made once per output field when the topology
/// compiles: the step's decimal scale then costs a `log10` once, not per
/// rounded value (that was 1% of the full pipeline).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rounding {
    pub step: f64,
    /// `10^d` for a step of `d` decimal places (1 for steps of 1 and more).
    decimal_scale: f64,
    /// `d`, for a step below 1.
    decimal_places: Option<u32>,
    /// The step is whole (a rounded number is whole too).
    whole_step: bool,
}

impl Rounding {
    pub fn new(step: f64) -> Self {
        let decimal_places = (step < 1.0).then(|| (-step.log10()).ceil() as u32);
        Rounding {
            step,
            decimal_scale: decimal_places.map_or(1.0, |d| 10f64.powi(d as i32)),
            decimal_places,
            whole_step: step.fract() == 0.0,
        }
    }

    /// The step's decimal places, for a step below 1 (`None` for steps of 1
    /// and more).
    pub fn decimal_places(&self) -> Option<u32> {
        self.decimal_places
    }

    pub fn whole_step(&self) -> bool {
        self.whole_step
    }

    /// A value `apply` gave, as a count of units of the last decimal place
    /// (`12.35` at two places is 1235); `None` when too large to be exact.
    pub fn decimal_units(&self, rounded: f64) -> Option<i64> {
        let units = round(rounded * self.decimal_scale);
        (units.abs() < (1u64 << 40) as f64).then_some(units as i64)
    }

    pub fn apply(&self, value: f64) -> f64 {
        let rounded = round(value / self.step) * self.step;
        if self.step >= 1.0 {
            return rounded;
        }
        // a second rounding at the step's decimal places removes the binary
        // noise of `k * 0.1` (cheaper than formatting and parsing)
        round(rounded * self.decimal_scale) / self.decimal_scale
    }
}

/// Rounds once to a multiple of `step` (see `Rounding`, which a hot path
/// keeps instead).
pub fn round_to_step(value: f64, step: f64) -> f64 {
    Rounding::new(step).apply(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_is_f64_round_bit_for_bit() {
        let mut values = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999999999999994,
            -0.49999999999999994,
            0.5000000000000001,
            4_503_599_627_370_495.5,
            -4_503_599_627_370_495.5,
            4_503_599_627_370_496.0,
            9e15,
            -9e15,
            1e300,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MAX,
            f64::MIN,
            0.3,
            -0.3,
            0.7,
            -0.7,
        ];
        // and a spread of magnitudes, halves and near-halves
        let mut rng = crate::bench::Rng::new(3);
        for _ in 0..200_000 {
            let seed = rng.next_u64();
            let x = f64::from_bits(seed);
            values.push(x);
            let scaled = (seed % 2_000_001) as f64 / 1000.0 - 1000.0;
            values.extend([scaled, scaled + 0.5, scaled * 1e9, scaled / 7.0]);
        }
        for x in values {
            assert_eq!(round(x).to_bits(), x.round().to_bits(), "round({x:e})");
            let expected = (x.fract() == 0.0 && x.abs() < 9e15).then_some(x as i64);
            assert_eq!(as_whole(x), expected, "as_whole({x:e})");
        }
    }

    #[test]
    fn civil_year_matches_known_dates() {
        assert_eq!(civil_year(0), 1970);
        assert_eq!(civil_year(1_640_995_200), 2022); // 2022-01-01T00:00:00Z
        assert_eq!(civil_year(1_640_995_199), 2021); // one second before
        assert_eq!(civil_year(951_782_400), 2000); // 2000-02-29 (leap day)
        assert_eq!(civil_year(-1), 1969);
    }

    #[test]
    fn days_on_market_counts_event_time_not_wall_clock() {
        assert_eq!(days_on_market(1_000, 1_000 + 86_400 * 3), 3.0);
        assert_eq!(days_on_market(1_000, 1_000 + 43_200), 0.5);
        assert_eq!(
            days_on_market(5_000, 1_000),
            0.0,
            "an event before the first one is clamped"
        );
    }

    #[test]
    fn days_since_price_change_falls_back_to_first_seen() {
        assert_eq!(days_since_price_change(0, None, 86_400 * 10), 10.0);
        assert_eq!(
            days_since_price_change(0, Some(86_400 * 8), 86_400 * 10),
            2.0
        );
    }

    #[test]
    fn price_drop_percent_handles_rises_and_missing() {
        assert_eq!(
            price_drop_percent(Some(20_000.0), Some(18_000.0)),
            Some(10.0)
        );
        assert_eq!(
            price_drop_percent(Some(20_000.0), Some(22_000.0)),
            Some(-10.0)
        );
        assert_eq!(price_drop_percent(None, Some(1.0)), None);
        assert_eq!(price_drop_percent(Some(0.0), Some(1.0)), None);
    }

    #[test]
    fn years_since_uses_the_event_year() {
        assert_eq!(years_since(Some(2015.0), 1_640_995_200), Some(7.0));
        assert_eq!(years_since(Some(2030.0), 1_640_995_200), Some(0.0));
        assert_eq!(years_since(None, 1_640_995_200), None);
    }

    #[test]
    fn ratio_applies_the_floor_and_refuses_zero() {
        assert_eq!(
            ratio(Some(100_000.0), Some(0.0), Some(1.0)),
            Some(100_000.0)
        );
        assert_eq!(ratio(Some(10.0), Some(0.0), None), None);
        assert_eq!(ratio(Some(10.0), Some(4.0), None), Some(2.5));
        assert_eq!(ratio(None, Some(4.0), None), None);
    }

    #[test]
    fn band_picks_the_first_threshold_above() {
        let steps = vec![(0.9, "great".to_string()), (1.05, "fair".to_string())];
        assert_eq!(band_index(0.5, &steps), 0);
        assert_eq!(band_index(0.9, &steps), 1);
        assert_eq!(band_index(2.0, &steps), 2, "past the last step: otherwise");
    }

    #[test]
    fn rounding_prints_cleanly() {
        assert_eq!(round_to_step(12.34, 0.1), 12.3);
        assert_eq!(round_to_step(12_344.0, 10.0), 12_340.0);
        assert_eq!(
            round_to_step(12_345.0, 10.0),
            12_350.0,
            "halves round away from zero"
        );
        assert_eq!(round_to_step(0.987, 0.01), 0.99);
        // each step rounds at its own decimal places
        for (value, step, expected) in [
            (0.987, 0.01, 0.99),
            (12.34, 0.1, 12.3),
            (1.23456, 0.001, 1.235),
            (0.0626, 0.05, 0.05),
            (7.77777, 0.0001, 7.7778),
            (3.24159, 0.5, 3.0),
        ] {
            assert_eq!(round_to_step(value, step), expected, "{value} to {step}");
        }
        assert_eq!(round_to_step(2.5, 1.0), 3.0);
    }
}
